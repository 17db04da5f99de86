"""model.py against transformers: logits, rope scaling, KV cache, prefix caching, and bad checkpoints."""
import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny_llama
import model as model_module
from model import (FP16_KERNELS, CheckpointError, KVCache, generate, load_model, prefill_prefix, set_fp16_weights,
                   set_int4_weights)


def _logits_match(directory, hf_model, T=40):
    ours, _ = load_model(directory, dtype=torch.float32, device="cpu")
    tokens = torch.randint(0, hf_model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape == (2, T, hf_model.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_tiny_logits_match_transformers(tmp_path):
    _logits_match(tmp_path, save_tiny_llama(tmp_path))


def test_tiny_tied_embeddings_match(tmp_path):
    _logits_match(tmp_path, save_tiny_llama(tmp_path, tie=True))


def test_llama3_rope_scaling_matches(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    hf = save_tiny_llama(tmp_path, rope_scaling=scaling, num_attention_heads=2, num_key_value_heads=1)
    _logits_match(tmp_path, hf, T=120)
    # the scaling must actually change the result, or the test would pass without implementing it
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path, plain, ignore=shutil.ignore_patterns("plain"))
    cfg = json.loads((plain / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (plain / "config.json").write_text(json.dumps(cfg))
    a, _ = load_model(tmp_path, dtype=torch.float32, device="cpu")
    b, _ = load_model(plain, dtype=torch.float32, device="cpu")
    x = torch.arange(100)[None] % 200  # positions past original_max_position_embeddings (32)
    assert (a(x) - b(x)).abs().max() > 1e-3


def test_meta_style_config_with_rope_theta_and_rope_scaling(tmp_path):
    """Meta's config.json carries rope_theta and rope_scaling at top level (transformers 5 writes rope_parameters)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    hf = save_tiny_llama(tmp_path, rope_scaling=scaling)
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _logits_match(tmp_path, hf, T=100)


def test_sharded_safetensors_with_index(tmp_path):
    from transformers import LlamaForCausalLM
    hf = save_tiny_llama(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "one" / f, tmp_path / "sharded" / f)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _logits_match(tmp_path / "sharded", hf)



@pytest.mark.skipif(not FP16_KERNELS, reason="this PyTorch build has no fbgemm kernels")
def test_fp16_weights_equal_transformers_with_fp16_rounded_weights(tmp_path):
    """set_fp16_weights: inference reads fp16 copies of every linear's weight (fbgemm). Reference: the
    transformers model with those weights rounded to fp16, everything else fp32; logits and greedy
    tokens (with prompt-lookup guesses) agree. Gradients take the exact fp32 weights; an in-place update
    of a weight (a LoRA merge) is seen; switching off gives the fp32 logits back exactly."""
    hf = save_tiny_llama(tmp_path)
    ours, _ = load_model(tmp_path, dtype=torch.float32, device="cpu")
    assert set_fp16_weights(ours) == 2 * 7 + 1                                   # the blocks' linears + LM head
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = hf(tokens).logits
        for m in hf.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(m.weight.half().float())
        rounded = hf(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, rounded, atol=1e-4, rtol=0)
    assert (got - exact).abs().max() > 1e-4                                    # the copies are really fp16
    prompts = [torch.randint(0, 200, (n,), generator=torch.Generator().manual_seed(n)).tolist() * 2 for n in (4, 9)]
    for p in prompts:
        theirs = hf.generate(torch.tensor([p]), max_new_tokens=40, min_new_tokens=40, do_sample=False)
        assert generate(ours, [p], max_new_tokens=40, draft=3)[0] == theirs[0, len(p):].tolist()
    x = torch.randn(3, 64, requires_grad=True)
    q = ours.layers[0].self_attn.q_proj
    torch.testing.assert_close(q(x), F.linear(x, q.weight), rtol=1e-6, atol=1e-6)   # grad mode: fp32 weights
    with torch.no_grad():
        q.weight.mul_(-1)                                                    # in place, as LoRA's merge
        hf.model.layers[0].self_attn.q_proj.weight.mul_(-1)
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
        q.weight.mul_(-1)
        set_fp16_weights(ours, False)
        assert torch.equal(ours(tokens), load_model(tmp_path, dtype=torch.float32, device="cpu")[0](tokens))


@pytest.mark.skipif(not model_module.ONEDNN_KERNELS, reason="this PyTorch build has no oneDNN")
def test_onednn_weights_give_f_linears_products_and_follow_the_weights(tmp_path):
    """A bf16 model loaded on a CPU reads weights reordered for oneDNN in every product that reads no
    4-bit codes (this safetensors model has none), from one row up. Reference: F.linear on the weight
    itself, per product (equal, or one bf16 rounding apart) and through the whole model (logits with the
    copies off). Linears of one input (q|k|v, gate|up) take one product with their weights stacked
    (fused_linears), split into each one's product. An in-place change of a weight (a LoRA merge) is seen;
    gradients take the weight; fp32 loads and switching off keep none."""
    from model import INT4_MAX_ROWS, Linear, fused_linears, set_onednn_weights
    save_tiny_llama(tmp_path)
    model, _ = load_model(tmp_path, dtype=torch.bfloat16, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(m.onednn for m in layers) and len(layers) == 2 * 7 + 1
    q = model.layers[0].self_attn.q_proj
    x = torch.randn(2, INT4_MAX_ROWS, q.in_features).bfloat16()

    def close_to_f_linear(y, x, weight=None):                      # at most one bf16 rounding (2^-8) apart
        weight = q.weight if weight is None else weight
        ref = F.linear(x.float(), weight.float())
        assert (y.float() - ref).abs().max() <= 2 ** -7 * ref.abs().max(), "not the weight's product"
        assert (y.float() - F.linear(x, weight).float()).abs().max() <= 2 ** -7 * ref.abs().max()
    with torch.no_grad():
        close_to_f_linear(q(x), x)
        assert "_onednn" in q.__dict__                                            # the reordered copy was read
        q.weight.mul_(-1)                                                          # in place, as a LoRA merge
        close_to_f_linear(q(x), x)
        q.weight.mul_(-1)
        del q.__dict__["_onednn"]
        close_to_f_linear(q(x[0, :1]), x[0, :1])                                   # one row, as in a decoding step
        assert "_onednn" in q.__dict__                                            # reordered too (no 4-bit codes)
        close_to_f_linear(model_module.onednn_linear(x, [q.weight], None), x)      # the op compiled graphs call
        attn = model.layers[0].self_attn
        qkv = (q, attn.k_proj, attn.v_proj)
        for _ in range(2):                                                         # k changed in place in between
            fused = model_module.onednn_linear(x, [m.weight for m in qkv], None)   # (2, 12, q + k + v outs)
            for y, m in zip((*fused_linears(x, qkv), *fused.split([m.out_features for m in qkv], -1)), qkv * 2):
                close_to_f_linear(y, x, m.weight)
            assert "_onednn_fused" in q.__dict__ and "_onednn" not in attn.k_proj.__dict__
            attn.k_proj.weight.mul_(-1)
        old = q.weight
        q.weight = torch.nn.Parameter(old.detach().clone(), requires_grad=False)   # a new weight: the op
        assert torch.equal(model_module.onednn_linear(x, [old], None), F.linear(x, old))   # falls back to F.linear
        assert torch.equal(model_module.onednn_linear(x, [old, attn.k_proj.weight], None),
                           F.linear(x, torch.cat((old, attn.k_proj.weight))))
        q.weight = old
    twin = copy.deepcopy(q)                                    # copies leave the opaque reordered weight out
    with torch.no_grad():
        assert "_onednn" not in twin.__dict__ and torch.equal(twin(x), q(x))
    xg = x.clone().requires_grad_()
    y = q(xg)
    assert torch.equal(y, F.linear(xg, q.weight)) and y.requires_grad          # training: the weight itself
    tokens = torch.randint(0, model.args.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.__dict__.pop("_onednn")
        on = model(tokens)
        copies = [[name for name in Linear.PACKED["onednn"] if name in m.__dict__] for m in layers]
        one_block = [["_onednn_fused"], [], [], ["_onednn"], ["_onednn_fused"], [], ["_onednn"]]   # q k v o gate up down
        assert copies == one_block * 2 + [["_onednn"]]                          # and the LM head
        assert set_onednn_weights(model, False) == 0
        assert not any(name in m.__dict__ for m in layers for name in Linear.PACKED["onednn"])
        off = model(tokens)
    torch.testing.assert_close(on.float(), off.float(), atol=0.05, rtol=0.02)
    fp32, _ = load_model(tmp_path, dtype=torch.float32, device="cpu")
    assert not any(m.onednn for m in fp32.modules() if isinstance(m, Linear))


# ----------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 65])
def test_split_linear_equals_f_linear(rows, monkeypatch):
    """model.linear splits a few-row product over the threads (decode); the same numbers as F.linear
    up to summation order, gradients included; more rows, odd widths and a bias take F.linear itself."""
    from model import linear
    monkeypatch.setattr(model_module, "SPLIT_MAX_ROWS", {torch.float32: 64})    # on, whatever this CPU's vendor
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g, requires_grad=True)
    w = torch.randn(200, 96, generator=g, requires_grad=True)
    y = linear(x, w)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    rx, rw = torch.autograd.grad(F.linear(x, w).square().sum(), (x, w))
    # sums of 200 products of size ~10 in another order: a few 1e-4 apart (seen on an AVX-512 CPU)
    torch.testing.assert_close((gx, gw), (rx, rw), rtol=1e-4, atol=1e-4)
    assert torch.equal(linear(x[None], w)[0], y)                              # leading dims are flattened
    assert linear(x[:, None], w).is_contiguous()     # (rows, 1, out) as decoding's q/k/v: SDPA needs it
    w_odd, b = torch.randn(201, 96, generator=g), torch.randn(200, generator=g)
    assert torch.equal(linear(x, w_odd), F.linear(x, w_odd))
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))


def test_batched_decode_attention_takes_a_fused_kernel(tiny_model, monkeypatch):
    """A decoding step at batch > 1 must not fall back to SDPA's unfused "math" path, which copies the
    repeated keys and values of every filled slot: measured on SmolLM2, 16 rows over 1,000 cached
    slots took 1.7 s per step that way against 0.17 s with the fused kernel (the split linear's output
    had a batch stride of 1)."""
    from torch.profiler import profile
    monkeypatch.setattr(model_module, "SPLIT_MAX_ROWS", {torch.float32: 64})    # the split's output feeds SDPA
    model, _ = tiny_model
    cache = KVCache(model.args, 4, 40, torch.float32, "cpu")
    with torch.inference_mode():
        model(torch.randint(0, model.args.vocab_size, (4, 30)), cache)
        with profile() as prof:
            model(torch.randint(0, model.args.vocab_size, (4, 1)), cache)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


def test_cache_prefill_then_decode_equals_full_forward_with_padding(tiny_model):
    model, _ = tiny_model
    g = torch.Generator().manual_seed(0)
    lengths, n_new = [12, 7, 3], 5
    rows = [torch.randint(0, model.args.vocab_size, (n + n_new,), generator=g) for n in lengths]
    full = [model(r[None])[0] for r in rows]                                     # each row alone, no cache
    T = max(lengths)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    real = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        tokens[i, T - n:], real[i, T - n:] = r[:n], True
    cache = KVCache(model.args, len(rows), T + n_new, torch.float32, "cpu")
    logits = model(tokens, cache, pad_mask=real)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(logits[i, T - n:], full[i][:n], atol=1e-5, rtol=0)
    for step in range(n_new):                                                    # one token at a time
        nxt = torch.stack([r[n + step] for r, n in zip(rows, lengths)])[:, None]
        out = model(nxt, cache)[:, -1]
        for i, n in enumerate(lengths):
            torch.testing.assert_close(out[i], full[i][n + step], atol=1e-5, rtol=0)


def test_last_only_gives_the_last_position_of_the_whole_forward(tiny_model):
    """last_only: the last block computes the last token's row alone (every token's keys and values still
    go in the cache); its logits equal the last position's of the whole forward, without a cache, into a
    cache with left padding, and after a shared prefix, and the cache holds the same keys and values."""
    model, _ = tiny_model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.args.vocab_size, (3, 9), generator=g)
    real = torch.ones_like(tokens, dtype=torch.bool)
    real[1, :4], real[2, :7] = False, False                                       # left padding
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens[:1], last_only=True), model(tokens[:1])[:, -1:], atol=1e-5, rtol=0)
        caches = [KVCache(model.args, 3, 12, torch.float32, "cpu") for _ in range(2)]
        whole = model(tokens, caches[0], pad_mask=real)[:, -1:]
        torch.testing.assert_close(model(tokens, caches[1], pad_mask=real, last_only=True), whole, atol=1e-5, rtol=0)
        for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        nxt = tokens[:, :2]                                                          # two more tokens after them
        torch.testing.assert_close(model(nxt, caches[1], last_only=True), model(nxt, caches[0])[:, -1:], atol=1e-5, rtol=0)
        shared = prefill_prefix(model, tokens[0].tolist(), max_len=20)
        rows = [KVCache(model.args, 3, 10, torch.float32, "cpu", shared=shared) for _ in range(2)]   # cascade attention
        torch.testing.assert_close(model(tokens, rows[1], pad_mask=real, last_only=True),
                                   model(tokens, rows[0], pad_mask=real)[:, -1:], atol=1e-5, rtol=0)


def test_generate_batched_equals_one_by_one(tiny_model):
    model, _ = tiny_model
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [40, 41, 42, 43]]
    batched = generate(model, prompts, max_new_tokens=10)
    single = [generate(model, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == single and all(len(o) == 10 for o in batched)


def test_prefix_caching_gives_the_same_tokens(tiny_model):
    model, _ = tiny_model
    prefix = list(range(30, 60))
    suffixes = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    cache = prefill_prefix(model, prefix, max_len=len(prefix) + 6 + 12)
    with_prefix = generate(model, suffixes, max_new_tokens=12, prefix=cache)
    without = [generate(model, [prefix + s], max_new_tokens=12)[0] for s in suffixes]
    assert with_prefix == without
    # sampled, seeded: the same seed gives the same tokens, with or without the cached prefix
    same_length = [[1, 2, 3], [7, 8, 9]]                       # no padding: the unmasked causal path
    assert generate(model, same_length, max_new_tokens=8, prefix=cache) == \
        [generate(model, [prefix + s], max_new_tokens=8)[0] for s in same_length]
    a = generate(model, suffixes, max_new_tokens=12, prefix=cache, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, [prefix + s for s in suffixes], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert a == b


def test_continuing_a_cache_over_turns_equals_generating_from_scratch(tiny_model):
    """Multi-turn use (the role-play of synth.py): each turn appends rows' new tokens of different lengths
    to one batched cache after a shared prefix, generated tokens are partly taken back (keep_first), rows
    leave the batch (select); every turn's tokens equal a fresh generation over the row's whole history."""
    model, _ = tiny_model
    prefix = list(range(30, 50))
    shared = prefill_prefix(model, prefix, len(prefix))
    cache = KVCache(model.args, 3, 120, torch.float32, "cpu", shared=shared)
    history = [[], [], []]                             # each row's tokens in the cache, after the prefix
    stop = 7
    for turn, new in enumerate(([[1, 2, 3], [4, 5], [6, 8, 9, 10, 11]], [[12], [13, 14, 15, 16], [17, 18]])):
        outs = generate(model, new, max_new_tokens=6, cache=cache, stop_ids=[stop])
        fresh = [generate(model, [prefix + h + x], max_new_tokens=6, stop_ids=[stop])[0]
                 for h, x in zip(history, new)]
        assert outs == fresh
        history = [h + x + o[:len(o) - i] for i, (h, x, o) in enumerate(zip(history, new, outs))]
        cache.keep_first([len(h) for h in history])    # row i takes back its last i generated tokens
    cache = cache.select([2, 0], max_len=200)          # row 1 ended; more room for the next turn
    history = [history[2], history[0]]
    new = [[19, 20], [21]]
    outs = generate(model, new, max_new_tokens=6, cache=cache, temperature=1.0, top_p=0.9, seed=5)
    fresh = generate(model, [prefix + h + x for h, x in zip(history, new)], max_new_tokens=6, temperature=1.0,
                     top_p=0.9, seed=5)
    assert outs == fresh and cache.max_len == 200


def test_finished_rows_leave_the_batch_without_changing_any_row(tiny_model, monkeypatch):
    """Once three quarters of the rows have finished, generate goes on with the others only (KVCache.select); every
    row still gets the tokens it gets alone (greedy), and a caller's cache gets every row's tokens back,
    so that the next turn continues each row exactly (greedy and sampled)."""
    model, _ = tiny_model
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    free = generate(model, prompts, max_new_tokens=12)
    stops = [free[0][1], free[1][3], free[2][2]]        # rows 0, 1 and 2 end early
    selects = []
    original = KVCache.select
    monkeypatch.setattr(KVCache, "select", lambda self, *a, **k: selects.append(1) or original(self, *a, **k))
    batched = generate(model, prompts, max_new_tokens=12, stop_ids=stops)
    assert selects and batched == [generate(model, [x], max_new_tokens=12, stop_ids=stops)[0] for x in prompts]
    prefixed = [[1, 2, 3] + x for x in prompts]
    free = generate(model, prefixed, max_new_tokens=12)
    stops = [free[0][1], free[1][3], free[2][2]]
    for kw in (dict(), dict(temperature=1.0, top_p=0.9, seed=4)):
        cache = KVCache(model.args, 4, 40, torch.float32, "cpu", shared=prefill_prefix(model, [1, 2, 3], 3))
        selects.clear()
        got = generate(model, prompts, max_new_tokens=12, stop_ids=stops, cache=cache, **kw)
        assert got == generate(model, prefixed, max_new_tokens=12, stop_ids=stops, **kw)
        assert selects or kw                               # greedy: three rows end early
        history = [[1, 2, 3] + x + o for x, o in zip(prompts, got)]
        assert cache.valid.sum(1).tolist() == [len(h) - 3 for h in history]   # a stop id is not cached
        turn2 = generate(model, [[30, 31]] * 4, max_new_tokens=5, cache=cache, **kw)
        assert turn2 == generate(model, [h + [30, 31] for h in history], max_new_tokens=5, **kw)


def test_prompt_lookup_drafts_what_followed_the_latest_earlier_occurrence():
    from model import PromptLookup
    look = PromptLookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert look.draft(3) == [7, 8, 5]          # (5, 2, 3) never occurred before; (2, 3) last did at 5-6
    look.extend([7])
    assert look.draft(2) == [8, 5]             # (2, 3, 7): the longest n-gram wins
    assert PromptLookup([1, 2, 3]).draft(4) == []


class StepCounter:
    """A `progress` for generate: counts its decoding steps."""
    steps = 0

    def update(self, n):
        self.steps += n


def test_prompt_lookup_drafts_give_the_greedy_tokens_in_fewer_steps(tiny_model, tiny_dir):
    """Speculative decoding with prompt-lookup guesses keeps exactly the tokens of greedy decoding:
    against Hugging Face's greedy generate, after a cached prefix, continuing a cache with stops, and in
    a cache with no room for guesses; with repeated prompts, the tiny model copies and the steps drop."""
    from transformers import LlamaForCausalLM
    model, _ = tiny_model
    hf = LlamaForCausalLM.from_pretrained(tiny_dir).float().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() * 2 for n in (3, 9, 17, 5)]
    plain, drafted = StepCounter(), StepCounter()
    expected = generate(model, prompts, max_new_tokens=80, progress=plain)
    assert generate(model, prompts, max_new_tokens=80, draft=4, progress=drafted) == expected
    assert drafted.steps < plain.steps            # a batch takes as many steps as its slowest row
    alone = StepCounter()
    assert [generate(model, [p], max_new_tokens=80, draft=4, progress=alone)[0] for p in prompts] == expected
    assert alone.steps < 0.7 * 4 * 81
    for p, e in zip(prompts, expected):
        theirs = hf.generate(torch.tensor([p]), max_new_tokens=80, min_new_tokens=80, do_sample=False)
        assert theirs[0, len(p):].tolist() == e
    prefix = list(range(30, 60))
    cache = prefill_prefix(model, prefix, len(prefix))
    assert generate(model, prompts, max_new_tokens=80, prefix=cache, draft=4, context=[prefix] * 4) == \
        generate(model, [prefix + p for p in prompts], max_new_tokens=80)
    stops = [e[k] for e, k in zip(expected, (5, 30, 12, 39))]
    for room in (300, 80 + 35):               # 35 = the longest prompt + 1: no room for guesses
        cache = KVCache(model.args, 4, room, torch.float32, "cpu")
        got = generate(model, prompts, max_new_tokens=80, cache=cache, stop_ids=stops, draft=4)
        assert got == generate(model, prompts, max_new_tokens=80, stop_ids=stops)
        turn2 = generate(model, [[7, 8]] * 4, max_new_tokens=6, cache=cache, draft=4) if room == 300 else None
        history = [p + o for p, o in zip(prompts, got)]
        assert turn2 in (None, generate(model, [h + [7, 8] for h in history], max_new_tokens=6))
    with pytest.raises(ValueError, match="greedy"):
        generate(model, prompts, max_new_tokens=4, draft=4, temperature=1.0)


def test_stop_ids_and_stop_strings(tiny_model):
    model, tok = tiny_model
    free = generate(model, [[5, 6, 7]], max_new_tokens=12)[0]
    stop = free[4]
    cut = generate(model, [[5, 6, 7]], max_new_tokens=12, stop_ids=[stop])[0]
    assert cut == free[:free.index(stop)]
    text = tok.decode(free[:3])
    by_string = generate(model, [[5, 6, 7]], max_new_tokens=12, stop_strings=[text], tokenizer=tok)[0]
    assert by_string == free[:3]


def test_top_p_keeps_only_the_nucleus():
    from model import sample_next
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, 0.75, g)) for _ in range(300)}
    assert seen == {0, 1}                       # 0.5 + 0.3 >= 0.75: tokens 2 and 3 never drawn
    assert int(sample_next(logits, 0.0, 1.0)) == 0



def test_nucleus_of_flat_rows_is_found_in_the_whole_vocabulary():
    """Rows whose 256 likeliest tokens hold less than top_p are sampled from the sorted vocabulary, the
    others from their top 256; each row draws what a full sort of its own probabilities gives."""
    from model import sample_next
    g = torch.Generator().manual_seed(0)
    vocab = 3000
    logits = torch.randn(6, vocab, generator=g) * torch.tensor([[8.0], [0.5], [8.0], [0.1], [3.0], [0.5]])
    uniforms = torch.rand(6, generator=g)
    probs = torch.softmax(logits, -1)
    top, order = probs.sort(-1, descending=True)
    expected = []
    for p_row, o_row, u in zip(top, order, uniforms):            # the nucleus by its definition, row by row
        n = int((p_row.cumsum(0) - p_row < 0.9).sum())
        cdf = p_row[:n].cumsum(0)
        expected.append(int(o_row[min(int((cdf <= u * cdf[-1]).sum()), n - 1)]))
    assert (probs.topk(256).values.sum(-1) < 0.9).tolist() == [False, True, False, True, False, True]
    assert sample_next(logits, 1.0, 0.9, uniforms=uniforms).tolist() == expected


def test_keep_freed_memory_reuses_large_blocks():
    """After keep_freed_memory, a freed 48 MB tensor's memory serves the next one: no fresh pages to
    fault in (glibc's default maps any block over 32 MB anew each time: 12,288 faults of 4 KiB). The
    best of eight tries, since other threads' allocations can land in between, and in a fresh process the
    first 2-4 tries still fault (seen run alone; without keep_freed_memory all eight do)."""
    import resource
    from model import keep_freed_memory
    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")

    def faults_of_a_second_48mb_tensor():
        torch.ones(12 << 20)                                      # 48 MB, freed at once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(12 << 20)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert min(faults_of_a_second_48mb_tensor() for _ in range(8)) < 1000

# ----------------------------------------------------------------------------- bad input
def test_bad_checkpoints_give_one_clear_error(tmp_path):
    save_tiny_llama(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="not a Hugging Face checkpoint directory or a .gguf"):
        load_model(tmp_path / "missing")
    trunc = tmp_path / "trunc"
    shutil.copytree(tmp_path / "ok", trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(trunc)
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "ok", other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="not a Llama model"):
        load_model(other)
    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "ok", wrong)
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight has shape \(128, 64\)"):
        load_model(wrong)
    (other / "model.safetensors").unlink()
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(other)


def test_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf
    import numpy as np
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(CheckpointError, match="architecture is 'gpt2'"):
        load_model(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="gpt2.gguf"):
        load_model(path)


@pytest.mark.skipif(not model_module.keeps_codes(torch.bfloat16, torch.device("cpu")), reason="no CPU 4-bit kernel here")
def test_gguf_4bit_codes_give_the_files_weights_and_few_row_products(tmp_path):
    """A Q4_0/Q4_1 GGUF weight's codes (read_codes) rebuild gguf's own dequantization exactly, rotary
    rows unpermuted as the weights, and so do a Q8_0 weight's (read_codes(q8=True)); a bf16 Linear keeping
    them computes up to int4_max_rows rows (Q8_MAX_ROWS) with the codes' kernel (= the product with the
    weight the kept codes give) and more rows, the gradient, or a weight changed in place with the bf16
    weight exactly."""
    import gguf
    import numpy as np
    import cpu_kernels
    from model import Q8_MAX_ROWS, Linear, _open_gguf, int4_max_rows
    path, rng = tmp_path / "tiny.gguf", np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("embedding_length", 64), ("block_count", 1), ("attention.head_count", 4),
                       ("attention.head_count_kv", 2), ("feed_forward_length", 96), ("vocab_size", 32)):
        (w.add_uint32 if isinstance(value, int) else w.add_float32)(f"llama.{key}", value)
    kinds = {"attn_q": ("Q4_0", 64), "attn_k": ("Q4_1", 32), "ffn_up": ("Q4_1", 96), "attn_v": ("F32", 32),
             "ffn_down": ("Q8_0", 64)}
    for name, (kind, rows) in kinds.items():
        x = (rng.standard_normal((rows, 64)) * 0.05 + rng.uniform(-0.02, 0.02, (rows, 1))).astype(np.float32)
        qtype = gguf.GGMLQuantizationType[kind]
        w.add_tensor(f"blk.0.{name}.weight", x if kind == "F32" else gguf.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _, read, _, _, read_codes = _open_gguf(path)
    assert read_codes("layers.0.self_attn.v_proj.weight") is None                    # not 4-bit
    assert read_codes("layers.0.mlp.down_proj.weight") is None                       # Q8_0 only when asked
    codes8, d8 = read_codes("layers.0.mlp.down_proj.weight", q8=True)
    assert torch.equal((codes8.float().view(64, -1, 32) * d8.float()[..., None]).view(64, -1),
                       read("layers.0.mlp.down_proj.weight"))
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"):
        codes, scale, zero = read_codes(f"layers.0.{name}.weight")
        weight = read(f"layers.0.{name}.weight")                                     # gguf.dequantize, unpermuted
        out, inp = weight.shape
        assert codes.shape == weight.shape and int(codes.min()) >= 0 and int(codes.max()) <= 15
        rebuilt = (codes.float() - 8).view(out, -1, 32) * scale[..., None] + zero[..., None]
        assert torch.equal(rebuilt.view(out, inp), weight)
        layer = Linear(inp, out, bias=False)
        layer.weight = torch.nn.Parameter(weight.bfloat16(), requires_grad=False)
        layer.keep_int4(codes, scale, zero)
        if cpu_kernels.available():                      # the hand-written kernel: the file's d and m exactly
            seen = cpu_kernels.unpack_q4(*layer._int4[:2])
            assert torch.equal(seen, weight)
        else:                                            # PyTorch's kernel: scale and zero in bf16
            seen = ((codes.float() - 8).view(out, -1, 32) * scale.bfloat16().float()[..., None]
                    + zero.bfloat16().float()[..., None]).view(out, inp)
        max_rows = int4_max_rows(layer._int4[1])
        for rows in (1, 4, max_rows):
            x = torch.randn(rows, inp).bfloat16()
            with torch.no_grad():
                got = layer(x)
            torch.testing.assert_close(got.float(), x.float() @ seen.t(), atol=2e-3, rtol=1e-2)
            assert not torch.equal(got, F.linear(x, layer.weight))                   # really the 4-bit kernel
        x = torch.randn(max_rows + 1, inp).bfloat16()
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, layer.weight))
        x1 = x[:1]
        assert torch.equal(layer(x1), F.linear(x1, layer.weight))                    # grad mode: the weight
        with torch.no_grad():
            layer.weight.mul_(-1)                                                    # in place, as a LoRA merge
            assert torch.equal(layer(x1), F.linear(x1, layer.weight))
    if cpu_kernels.available():                          # the Q8_0 weight through the Q8 kernel
        weight = read("layers.0.mlp.down_proj.weight")
        layer = Linear(64, 64, bias=False)
        layer.weight = torch.nn.Parameter(weight.bfloat16(), requires_grad=False)
        layer.keep_q8(codes8, d8)
        for rows in (1, Q8_MAX_ROWS):
            x = torch.randn(rows, 64).bfloat16()
            with torch.no_grad():
                got = layer(x)
            torch.testing.assert_close(got.float(), (x.double() @ weight.double().t()).float(), atol=2e-3, rtol=1e-2)
            assert not torch.equal(got, F.linear(x, layer.weight))
        x = torch.randn(Q8_MAX_ROWS + 1, 64).bfloat16()
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, layer.weight))
            layer.weight.mul_(-1)
            assert torch.equal(layer(x[:1]), F.linear(x[:1], layer.weight))


@pytest.mark.slow
def test_compiled_inference_equals_the_eager_blocks(tiny_dir, monkeypatch):
    """compile_for_inference: a cache-less prefill, a padded batch prefilled into a cache then decoded a
    token at a time, and greedy decoding of 16 rows after a shared prefix (with and without guesses) give
    the eager blocks' logits and tokens (fp32). The compiled parts serve every layer and length: a few
    graphs in all, not one per layer or length. Steps after a shared prefix, and few-row forwards without a
    cache, stay eager; models with LoRA layers and machines without a C++ compiler are refused, with the reason."""
    from lora import LoRAConfig, add_lora
    # the tiny model's calls are short: compile those of more than 12 rows (SmolLM2's prefills compile)
    monkeypatch.setattr(model_module, "COMPILED_MIN_ROWS", 12)
    model, _ = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    V = model.args.vocab_size
    lengths = [12, 7, 3]
    tokens = torch.randint(0, V, (len(lengths), 14), generator=g)
    real = torch.ones_like(tokens, dtype=torch.bool)
    for i, n in enumerate(lengths):
        real[i, :14 - n] = False                                                # left padding
    prefix = torch.randint(0, V, (30,), generator=g).tolist()
    suffixes = [torch.randint(0, V, (1 + i % 5,), generator=g).tolist() for i in range(16)]

    def run():
        with torch.inference_mode():
            whole = model(torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(1)))
            cache = KVCache(model.args, len(lengths), 20, torch.float32, "cpu")
            steps = [model(tokens, cache, pad_mask=real)]
            for t in range(4):                                   # 3 rows: the compiled decoding step
                steps.append(model(tokens[:, t:t + 1], cache))
        shared = prefill_prefix(model, prefix, max_len=len(prefix) + 5 + 8 + 4)
        greedy = [generate(model, suffixes, 8, prefix=shared, draft=d) for d in (0, 3)]
        return whole, steps, greedy
    eager = run()
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert model_module.compile_for_inference(model) is None
    compiled = run()
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=0)
    for c, e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=0)
    assert compiled[2] == eager[2] and eager[2][0] == eager[2][1]
    graphs = counters["stats"]["unique_graphs"]
    assert 4 <= graphs <= 13 and not counters["graph_break"]    # 3 parts x a few shapes + a step, not one per layer
    generate(model, [suffixes[0]], 8)                                  # one row: a decoding graph of its own
    assert counters["stats"]["unique_graphs"] == graphs + 1
    monkeypatch.undo()                                   # the default: a 16-row step eager, a longer prefill compiled
    compiled_rows = []
    monkeypatch.setattr(model, "_compiled_blocks", lambda x, *a: compiled_rows.append(x.shape[:2])
                        or model_module.Llama._compiled_blocks(model, x, *a))
    with torch.no_grad():
        model(torch.zeros(16, 1, dtype=torch.long))
        model(torch.zeros(1, model_module.COMPILED_MIN_ROWS + 1, dtype=torch.long))
    assert compiled_rows == [(1, model_module.COMPILED_MIN_ROWS + 1)]
    assert model_module.compile_for_inference(model, False) is None and not model.compiled
    # bf16 on a CPU: inside the graphs the linears read their oneDNN-reordered weights (model.onednn_linear)
    looked_up = []

    class Lookups(dict):
        def get(self, key, default=None):
            looked_up.append(key)
            return super().get(key, default)
    monkeypatch.setattr(model_module, "_LINEAR_OF_WEIGHT", Lookups())
    used, packed_product = [], model_module.packed_product
    monkeypatch.setattr(model_module, "packed_product", lambda x, packed, bias=None: used.append(packed)
                        or packed_product(x, packed, bias))
    b16, _ = load_model(tiny_dir, dtype=torch.bfloat16, device="cpu")
    tokens16 = torch.randint(0, V, (2, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager16 = b16(tokens16)
        assert model_module.compile_for_inference(b16) is None and not looked_up
        used.clear()
        compiled16 = b16(tokens16)
    copies = {id(m.__dict__[name][0]) for m in b16.modules() if isinstance(m, model_module.Linear)
              for name in ("_onednn", "_onednn_fused") if name in m.__dict__}     # each block product's, the head's
    assert {id(p) for p in used} == copies and len(used) == len(copies)             # each once
    firsts = {id(b.get_submodule(names[0]).weight) for b in b16.layers for names in model_module.BLOCK_PRODUCTS}
    assert set(looked_up) == firsts and len(looked_up) == len(firsts)   # the blocks' through the op, the quick way
    torch.testing.assert_close(compiled16.float(), eager16.float(), atol=0.05, rtol=0.02)
    monkeypatch.setenv("CXX", "no-such-compiler++")
    assert "no-such-compiler++" in model_module.compile_for_inference(model)
    monkeypatch.delenv("CXX")
    if FP16_KERNELS:
        set_fp16_weights(model)
        assert "fp16 weight copies" in model_module.compile_for_inference(model)
        set_fp16_weights(model, False)
    add_lora(model, LoRAConfig())
    assert "LoRALinear" in model_module.compile_for_inference(model) and not model.compiled


@pytest.mark.slow
def test_compiled_decoding_step_equals_the_eager_step(tiny_dir, monkeypatch):
    """compile_for_inference runs a decoding step (one new token per row after a cache, or one and its prompt-lookup
    guesses) as one compiled graph (Llama._compiled_step): padded rows, a finished row's padding token, a row's
    padding after its guesses and the unfilled slots are masked as eagerly, with the same logits and cache (fp32);
    one graph serves every cache length. In bf16 the graph
    reads the kept 4-bit codes, stacked over the layers (the weights with set_int4_weights off), and a weight
    changed in place since sends the step back to eager."""
    model, _ = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    V = model.args.vocab_size
    tokens = torch.randint(0, V, (3, 10), generator=g)
    real = torch.ones_like(tokens, dtype=torch.bool)
    real[1, :6], real[2, :3] = False, False                                          # left padding
    steps = torch.randint(0, V, (3, 5), generator=g)
    step_real = torch.ones_like(steps, dtype=torch.bool)
    step_real[1, 2:] = False                                            # row 1 finished: padding tokens
    guesses = torch.randint(0, V, (3, 4), generator=g)            # a step with 3 guesses: row 2 has one guess
    guess_real = torch.tensor([[True] * 4, [False] * 4, [True, True, False, False]])

    def run(m, max_len, dtype=torch.float32):
        with torch.inference_mode():
            cache = KVCache(m.args, 3, max_len, dtype, "cpu")
            out = [m(tokens, cache, pad_mask=real, last_only=True)]                 # eager: 30 rows
            for t in range(steps.shape[1]):
                out.append(m(steps[:, t:t + 1], cache, pad_mask=step_real[:, t:t + 1]))
            out.append(m(guesses, cache, pad_mask=guess_real))
        return torch.cat(out, 1), cache
    eager, eager_cache = run(model, 19)
    calls = []

    def spy_on_steps(m):                                   # the shapes of m's compiled steps go in `calls`
        monkeypatch.setattr(m, "_compiled_step", lambda x, *a: calls.append(x.shape)
                            or model_module.Llama._compiled_step(m, x, *a))
    spy_on_steps(model)
    assert model_module.compile_for_inference(model) is None
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled, cache = run(model, 19)
    assert calls == [(3, 1, model.args.dim)] * steps.shape[1] + [(3, 4, model.args.dim)]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    for c, e in zip(cache.k + cache.v, eager_cache.k + eager_cache.v):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=0)
    assert torch.equal(cache.valid, eager_cache.valid) and torch.equal(cache.next_pos, eager_cache.next_pos)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 2 and not counters["graph_break"]   # 1 and 4 tokens per row; 0 if an earlier test compiled them
    torch.testing.assert_close(run(model, 37)[0], eager, atol=1e-5, rtol=0)           # another cache length
    assert counters["stats"]["unique_graphs"] == graphs

    # generate, greedy and sampled: finished rows leave the batch (fewer rows), a caller's cache takes a second turn
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    free = generate(model, prompts, max_new_tokens=12)
    stops = [free[0][1], free[1][3], free[2][2]]                                  # rows 0, 1 and 2 end early

    def conversation(**kw):
        cache = KVCache(model.args, 4, 60, torch.float32, "cpu")
        first = generate(model, prompts, max_new_tokens=12, stop_ids=stops, cache=cache, **kw)
        return first, generate(model, [[30, 31]] * 4, max_new_tokens=5, cache=cache, **kw)
    for kw in (dict(), dict(draft=3), dict(temperature=1.0, top_p=0.9, seed=4)):
        model_module.compile_for_inference(model, False)
        eager_turns = conversation(**kw)
        model_module.compile_for_inference(model)
        calls.clear()
        assert conversation(**kw) == eager_turns
        assert kw or {shape[0] for shape in calls} >= {4, 2, 1}                 # greedy: three rows end early
        assert not kw.get("draft") or {shape[1] for shape in calls} > {1}       # steps with guesses compiled too

    # bf16 with 4-bit codes that are not the weights' own (random): the compiled step reads the codes
    b16, _ = load_model(tiny_dir, dtype=torch.bfloat16, device="cpu")
    layers = [m for b in b16.layers for m in b.modules() if isinstance(m, model_module.Linear)]
    for layer in layers:
        out, inp = layer.weight.shape
        layer.keep_int4(torch.randint(0, 16, (out, inp), generator=g), torch.rand(out, inp // 32, generator=g) * 0.02,
                        torch.randn(out, inp // 32, generator=g) * 0.01)
    with_codes = run(b16, 19, torch.bfloat16)[0].float()
    set_int4_weights(b16, False)
    with_weights = run(b16, 19, torch.bfloat16)[0].float()
    set_int4_weights(b16, True)
    assert model_module.compile_for_inference(b16) is None
    # the step reads the codes stacked over the layers: gate|up as one product (outs of 128, a multiple of
    # PyTorch's kernel's 64-row packing), q|k|v one each (k and v have 32 outs); the hand-written kernel's
    # codes are row by row, so q|k|v are one product too
    import cpu_kernels
    assert [len(kind) for kind in b16.decode_inputs[1]] == ([1, 1, 1, 1] if cpu_kernels.available() else [3, 1, 1, 1])
    compiled = run(b16, 19, torch.bfloat16)[0].float()
    torch.testing.assert_close(compiled, with_codes, atol=0.05, rtol=0.02)
    assert (compiled[:, 1:] - with_weights[:, 1:]).abs().max() > 0.5          # the steps differ from the weights'
    set_int4_weights(b16, False)                                   # the compiled step reads the weights instead
    torch.testing.assert_close(run(b16, 19, torch.bfloat16)[0].float(), with_weights, atol=0.05, rtol=0.02)
    set_int4_weights(b16, True)

    # one row of one token: the compiled step's LM head is row_product (fused products and sums), the same logits
    def one_row(m):
        with torch.inference_mode():
            cache = KVCache(m.args, 1, 16, torch.bfloat16, "cpu")
            m(tokens[:1], cache, last_only=True)
            return torch.cat([m(steps[:1, t:t + 1], cache) for t in range(3)], 1).float()   # (1, 3, vocab)
    heads = []
    real_row_product = model_module._compiled_row_product()
    monkeypatch.setattr(model_module, "_compiled_row_product",
                        lambda: lambda x, w: heads.append(x.shape) or real_row_product(x, w))
    compiled_row = one_row(b16)
    assert heads == [(1, 1, b16.args.dim)] * 3
    model_module.compile_for_inference(b16, False)
    torch.testing.assert_close(compiled_row, one_row(b16), atol=0.01, rtol=0)       # logits up to ~0.4 here
    assert len(heads) == 3                                                         # eager steps: the Linear
    model_module.compile_for_inference(b16)

    with torch.no_grad():
        layers[0].weight.mul_(-1)                         # in place, as a LoRA merge, after the codes were gathered
    calls.clear()
    spy_on_steps(b16)
    stale = run(b16, 19, torch.bfloat16)[0]
    model_module.compile_for_inference(b16, False)
    assert torch.equal(stale, run(b16, 19, torch.bfloat16)[0]) and not calls      # the eager steps, as here


@pytest.mark.slow
def test_frozen_decoding_step_reads_the_weights_as_constants(tiny_dir, monkeypatch):
    """compile_for_inference(freeze=True): decoding steps through the graph compiled with inductor's freezing give
    the eager steps' logits and cache (fp32), in bf16 with 4-bit codes too; the graph holds the weights as its
    own constants (changed behind the version check, its steps keep the old weights), so a weight changed in
    place sends the steps back to eager, which sees the change."""
    model, _ = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.args.vocab_size, (3, 9), generator=g)
    real = torch.ones_like(tokens, dtype=torch.bool)
    real[1, :4] = False                                                             # left padding
    steps = torch.randint(0, model.args.vocab_size, (3, 4), generator=g)

    def run(m, dtype=torch.float32, scale_up_proj=None):     # (the up_proj's weight scaled after the prefill)
        with torch.inference_mode():
            cache = KVCache(m.args, 3, 16, dtype, "cpu")
            out = [m(tokens, cache, pad_mask=real, last_only=True)]                  # eager: 27 rows
            if scale_up_proj:
                m.layers[0].mlp.up_proj.weight.mul_(scale_up_proj)
            out += [m(steps[:, t:t + 1], cache) for t in range(steps.shape[1])]
            if scale_up_proj:
                m.layers[0].mlp.up_proj.weight.mul_(1 / scale_up_proj)
        return torch.cat(out, 1).float(), cache
    eager, eager_cache = run(model)
    frozen_calls = []
    real_frozen = model_module._compiled_frozen_decode("cpu")
    monkeypatch.setattr(model_module, "_compiled_frozen_decode",
                        lambda device: lambda *a: frozen_calls.append(a[4].shape) or real_frozen(*a))
    assert model_module.compile_for_inference(model, freeze=True) is None
    frozen, cache = run(model)
    assert frozen_calls == [(3, 1, model.args.dim)] * steps.shape[1]
    torch.testing.assert_close(frozen, eager, atol=1e-5, rtol=0)
    for c, e in zip(cache.k + cache.v, eager_cache.k + eager_cache.v):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=0)

    up_proj = model.layers[0].mlp.up_proj                        # stacked with gate_proj in the graph
    with torch.no_grad():
        up_proj.weight.mul_(-16)                                 # in place, as a LoRA merge
    model_module.compile_for_inference(model, False)
    changed = run(model)[0]
    assert (changed[:, 1:] - eager[:, 1:]).abs().max() > 0.1
    model_module.compile_for_inference(model, freeze=True)    # gathers the changed weights, a new graph
    frozen_calls.clear()
    torch.testing.assert_close(run(model)[0], changed, atol=1e-5, rtol=0)
    assert len(frozen_calls) == steps.shape[1]
    with torch.no_grad():
        up_proj.weight.mul_(-1 / 16)                             # back to the first weights, in place
    frozen_calls.clear()
    torch.testing.assert_close(run(model)[0], eager, atol=1e-5, rtol=0)     # eager steps see the change
    assert not frozen_calls
    # past the version check, the graph's steps read its constants, the weights it was compiled with
    monkeypatch.setattr(model, "_decode_copies_current", lambda: True)
    stale = run(model)[0]                                  # the eager prefill reads the first weights
    assert len(frozen_calls) == steps.shape[1]
    model_module.compile_for_inference(model, False)
    torch.testing.assert_close(stale, run(model, scale_up_proj=-16)[0], atol=1e-5, rtol=0)

    # bf16 with 4-bit codes (random, not the weights' own): steps that read the codes (up to 12 rows) take the
    # usual graph, the others (the codes off here) the frozen one
    b16, _ = load_model(tiny_dir, dtype=torch.bfloat16, device="cpu")
    for layer in (m for b in b16.layers for m in b.modules() if isinstance(m, model_module.Linear)):
        out, inp = layer.weight.shape
        layer.keep_int4(torch.randint(0, 16, (out, inp), generator=g), torch.rand(out, inp // 32, generator=g) * 0.02,
                        torch.randn(out, inp // 32, generator=g) * 0.01)
    assert model_module.compile_for_inference(b16) is None
    with_codes = run(b16, torch.bfloat16)[0]
    set_int4_weights(b16, False)
    with_weights = run(b16, torch.bfloat16)[0]
    set_int4_weights(b16, True)
    assert model_module.compile_for_inference(b16, freeze=True) is None
    frozen_calls.clear()
    torch.testing.assert_close(run(b16, torch.bfloat16)[0], with_codes, atol=0.05, rtol=0.02)
    assert not frozen_calls
    set_int4_weights(b16, False)
    torch.testing.assert_close(run(b16, torch.bfloat16)[0], with_weights, atol=0.05, rtol=0.02)
    assert len(frozen_calls) == steps.shape[1]
    assert (with_codes[:, 1:] - with_weights[:, 1:]).abs().max() > 0.5          # the two differ


def test_sequence_longer_than_context_is_refused(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match="longer than the context of 1024"):
        model(torch.zeros(1, 1100, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit the context"):
        generate(model, [[1] * 1100], max_new_tokens=2)


# ----------------------------------------------------------------------------- the embedded SmolLM2
REAL_CHAT = [{"role": "user", "content": "I need a long lasting 6.76 fl oz bottle of l'eau d'issey. "
                                         "What should I search for in the shop, and why?"},
             {"role": "assistant", "content": "Thought: I should search for the product. Action: search[l'eau d'issey]"},
             {"role": "user", "content": "Observation: Page 1 (Total results: 50) [SEP] Next > [SEP] B000VOHH8I"}]


@pytest.mark.slow
def test_smollm2_logits_and_greedy_match_transformers(smollm, smollm_hf):
    """Both read the same Q4_1 GGUF and dequantize it to the same fp32 weights, so the only difference
    is summation order in fp32 matmuls over 30 layers: we observe ~1e-4 on logits of magnitude ~20,
    and allow 2e-3 (1e-4 relative to the logit scale) — far below any token-level change."""
    model, tok = smollm
    hf, _ = smollm_hf
    ids = tok.apply_chat(REAL_CHAT)[:64]
    assert len(ids) == 64
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = hf(x).logits
        got = model(x)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    prompt = tok.apply_chat(REAL_CHAT)
    ours = generate(model, [prompt], max_new_tokens=32)[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, len(prompt):]
    assert ours == theirs.tolist()
    assert generate(model, [prompt], max_new_tokens=32, draft=4)[0] == ours      # prompt-lookup guesses
    if FP16_KERNELS:          # fp16 copies of the weights (as synth, evaluate and train's check run on a CPU)
        set_fp16_weights(model)
        try:
            with torch.no_grad():
                torch.testing.assert_close(model(x), expected, atol=0.2, rtol=0)    # we observe 0.05 (logits up to 38)
            assert generate(model, [prompt], max_new_tokens=32, draft=4)[0] == ours
        finally:
            set_fp16_weights(model, False)


@pytest.mark.slow
@pytest.mark.skipif(not model_module.keeps_codes(torch.bfloat16, torch.device("cpu")), reason="no CPU 4-bit kernel here")
def test_smollm2_bf16_decodes_from_the_files_4bit_codes_as_closely_as_from_bf16_weights(smollm_path, smollm):
    """The embedded GGUF stores the block linears in Q4_1 (and the tied embedding in Q8_0): a bf16 load keeps
    their codes and decoding steps read them (the head's with cpu_kernels). Teacher-forced one token at a
    time against the fp32 model, the next-token distributions are as close as with the bf16 weights (we
    observe KL ~1e-3 either way, top-1 agreement 96-100%)."""
    import cpu_kernels
    from model import set_int4_weights
    m32, tok = smollm
    model, _ = load_model(smollm_path, dtype=torch.bfloat16, device="cpu")
    assert set_int4_weights(model) == 7 * 30
    assert ("_q8" in model.lm_head.__dict__) == cpu_kernels.available()
    ids = tok.apply_chat(REAL_CHAT)
    ids = ids + generate(m32, [ids], 24)[0]
    P, x = len(ids) - 24, torch.tensor([ids])
    with torch.no_grad():
        ref = m32(x)[0, P - 1:-1].log_softmax(-1)                               # (24, vocab)
        kl, agree, steps = {}, {}, {}
        for on in (True, False):
            set_int4_weights(model, on)
            cache = KVCache(model.args, 1, len(ids), torch.bfloat16, "cpu")
            model(x[:, :P - 1], cache=cache)
            got = torch.cat([model(x[:, i:i + 1], cache=cache)[0].float() for i in range(P - 1, len(ids) - 1)])
            steps[on], got = got, got.log_softmax(-1)
            kl[on] = float((got.exp() * (got - ref)).sum(-1).mean())
            agree[on] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    set_int4_weights(model)
    assert not torch.equal(steps[True], steps[False])                            # the codes were read
    assert kl[True] < 5e-3 and kl[True] < 3 * kl[False] and agree[True] >= 0.9, (kl, agree)


@pytest.mark.slow
def test_smollm2_answers_sensibly(smollm):
    model, tok = smollm
    ids = tok.apply_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = generate(model, [ids], max_new_tokens=20, stop_ids=tok.stop_ids)[0]
    assert "Paris" in tok.decode(out)


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-flash", "matmuls"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prefix_attention_equals_attention_over_the_concatenation(fused, dtype):
    """attend_after_prefix (one prefix copy for the batch, merged by log-sum-exp) == SDPA over
    [prefix | own slots] per row, on slices of a larger cache as in decoding, by both of its kernels."""
    from model import attend_after_prefix
    g = torch.Generator().manual_seed(0)
    B, H, KVH, P, S, hd = 3, 6, 2, 7, 5, 8
    kp, vp = torch.randn(1, KVH, P, hd, generator=g), torch.randn(1, KVH, P, hd, generator=g)
    k_all, v_all = torch.randn(B, KVH, S + 4, hd, generator=g), torch.randn(B, KVH, S + 4, hd, generator=g)
    k, v = k_all[:, :, :S], v_all[:, :, :S]                       # the filled slots of a cache
    for T, mask in ((1, None), (S, None), (3, None), (3, torch.rand(B, 1, 3, S, generator=g) > 0.3)):
        if mask is not None:
            mask[..., -1] = True                                  # no empty row
        q = torch.randn(B, H, T, hd, generator=g)
        full_k, full_v = torch.cat((kp.expand(B, -1, -1, -1), k), 2), torch.cat((vp.expand(B, -1, -1, -1), v), 2)
        own = mask if mask is not None else torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]
        full_mask = torch.cat((torch.ones(B, 1, T, P, dtype=torch.bool), own.expand(B, 1, T, S)), -1)
        expected = torch.nn.functional.scaled_dot_product_attention(q.double(), full_k.double(), full_v.double(),
                                                                    attn_mask=full_mask, enable_gqa=True)
        got = attend_after_prefix(*(t.to(dtype) for t in (q, k, v, kp, vp)), mask, fused=fused)
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu_kernels", "pytorch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_by_blocks_equals_sdpa_forward_and_backward(dtype, kernels, monkeypatch):
    """causal_attention_by_blocks (query blocks, grouped-query heads folded) == causal SDPA in fp64, for block
    edges inside and at the end, T below one block, queries in the last T of S cached slots, g = 1 and 3;
    and so are its gradients (its own backward, how training takes it); in bf16 with cpu_kernels' softmax where
    they are built, and with PyTorch's."""
    from model import causal_attention_by_blocks
    if not kernels:
        monkeypatch.setattr(model_module.cpu_kernels, "available", lambda: False)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():           # as a prefill, before training in the same process (train.py does)
        causal_attention_by_blocks(*(torch.randn(1, 2, 5, 8, dtype=dtype) for _ in range(3)), block=4)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for B, H, KVH, T, S, block in ((2, 6, 2, 11, 11, 4), (1, 3, 3, 8, 8, 4), (2, 6, 2, 3, 3, 4), (2, 6, 2, 9, 13, 4)):
        q = torch.randn(B, H, T, hd := 8, generator=g).to(dtype).requires_grad_()
        k, v = (torch.randn(B, KVH, S + 2, hd, generator=g)[:, :, :S].to(dtype).requires_grad_() for _ in range(2))
        allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T)                # query i sees slots <= S - T + i
        expected = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), attn_mask=allowed, enable_gqa=True)
        expected = expected.transpose(1, 2).reshape(B, T, H * hd)
        got = causal_attention_by_blocks(q, k, v, block=block)
        assert got.dtype == dtype and got.shape == (B, T, H * hd)
        torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
        out_grad = torch.randn(B, T, H * hd, generator=g)
        want = torch.autograd.grad(expected, (q, k, v), out_grad.double())
        for got_grad, want_grad in zip(torch.autograd.grad(got, (q, k, v), out_grad.to(dtype)), want):
            torch.testing.assert_close(got_grad.double(), want_grad.double(), atol=2 * tol, rtol=2 * tol)


def test_bf16_prefill_attends_by_query_blocks_on_a_cpu(tiny_dir, monkeypatch):
    """A bf16 prefill of ATTENTION_BLOCK tokens or more takes causal_attention_by_blocks in every layer (here in
    blocks of 16, 16 and 8), with and without a cache, and its logits stay as close to the fp32 model's as SDPA's
    (the scores are rounded to bf16)."""
    b16, _ = load_model(tiny_dir, dtype=torch.bfloat16, device="cpu")
    m32, _ = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    calls = []
    real = model_module.causal_attention_by_blocks
    monkeypatch.setattr(model_module, "causal_attention_by_blocks", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(model_module, "ATTENTION_BLOCK", 16)
    x = torch.randint(0, b16.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m32(x)
        by_blocks = b16(x).float()
        assert calls == [16] * b16.args.n_layers                                   # the blocks' size, passed
        cache = KVCache(b16.args, 2, 48, torch.bfloat16, "cpu")
        torch.testing.assert_close(b16(x, cache=cache).float(), by_blocks, atol=0, rtol=0)
        assert len(calls) == 2 * b16.args.n_layers
        monkeypatch.setattr(model_module, "ATTENTION_BLOCK", 10 ** 6)
        by_sdpa = b16(x).float()
    assert len(calls) == 2 * b16.args.n_layers
    err_blocks, err_sdpa = (by_blocks - ref).abs().max(), (by_sdpa - ref).abs().max()
    assert err_blocks < 2 * err_sdpa + 1e-2, (err_blocks, err_sdpa)


@pytest.mark.slow
def test_smollm2_bf16_prefill_by_query_blocks_is_as_close_to_fp32_as_sdpa(smollm_path, smollm, monkeypatch):
    """SmolLM2 in bf16 over a 600-token prompt: the next-token distributions after a prefill by query blocks are as
    close to the fp32 model's as after SDPA's kernel (we observe KL 7.5e-4 against 8.5e-4, top-1 agreement 99.0% against
    98.8%)."""
    m32, tok = smollm
    b16, _ = load_model(smollm_path, dtype=torch.bfloat16, device="cpu")
    ids = (tok.apply_chat(REAL_CHAT) * 8)[:600]
    x = torch.tensor([ids])
    blocks, sdpa = model_module.ATTENTION_BLOCK, 10 ** 6                           # SDPA: no prefill is that long
    with torch.no_grad():
        ref = m32(x)[0].log_softmax(-1)                                            # (600, vocab)
        kl, agree = {}, {}
        for block in (blocks, sdpa):
            monkeypatch.setattr(model_module, "ATTENTION_BLOCK", block)
            got = b16(x)[0].float().log_softmax(-1)
            kl[block] = float((got.exp() * (got - ref)).sum(-1).mean())
            agree[block] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    assert kl[blocks] < 1.5 * kl[sdpa] and agree[blocks] >= agree[sdpa] - 0.02, (kl, agree)
