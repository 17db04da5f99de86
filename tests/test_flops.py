"""profile_flops.py (paper section 8): the hand-written counter against torch.utils.flop_counter, the LoRA cost
formula, hand-computed elementwise counts, the turn plans, the shipped conversation and the CLI.

FlopCounterMode counts matmuls only (aten.mm for the linears, aten.bmm for attention). On CPU, SDPA's default
kernel (_scaled_dot_product_flash_attention_for_cpu) has no flop formula and counts 0, so the forwards run
under SDPBackend.MATH, which computes (and FlopCounterMode counts) the full T_new x (T_past + T_new) score
rectangle with every query head, as the counter does. On the meta device SDPA takes the math path anyway.
"""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import model
import profile_flops as pf
from model import CONFIGS, KVCache, Llama, ModelArgs

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=128, max_seq_len=256,
                 tie_embeddings=False, name="tiny")


@pytest.fixture(autouse=True)
def linears_as_mm(monkeypatch):
    """FlopCounterMode names each op: with the split of few-row linears (model.linear) off, every
    linear counts as mm and attention as bmm, so the two can be told apart. The split does the same
    FLOPs (test_split_linears_count_the_same_flops)."""
    monkeypatch.setattr(model, "SPLIT_MAX_ROWS", {})


def measured(fn):
    """FlopCounterMode's counts of fn(): {"Global": {"mm": .., "bmm": ..}, "<module path>": {...}}."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return {mod: {str(op).removeprefix("aten."): n for op, n in ops.items()} for mod, ops in fc.get_flop_counts().items()}


def linear_flops(c):
    return 2 * c["macs_linear"]


def attention_flops(c):
    return 2 * c["macs_attention"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Llama(TINY).float().eval()


def test_full_forward_matches_flop_counter_per_linear(tiny):
    counts = measured(lambda: tiny(torch.randint(0, 300, (1, 10))))
    ours = pf.count_forward(TINY, 10)
    for layer in range(TINY.n_layers):
        for name in pf.LORA_TARGETS:
            parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            assert counts[f"Llama.layers.{layer}.{parent}.{name}"]["mm"] == ours["layer"][name]["flops"], name
        # the block calls its attention's parts (Attention.project, .attend), so attention counts in the block
        assert counts[f"Llama.layers.{layer}"]["bmm"] == ours["layer"]["qk"]["flops"] + ours["layer"]["av"]["flops"]
    assert counts["Llama.lm_head"]["mm"] == ours["lm_head"]["flops"]
    assert counts["Global"] == {"mm": linear_flops(ours), "bmm": attention_flops(ours)}
    assert ours["flops_matmul"] == sum(counts["Global"].values()) == 2 * ours["macs"]


def test_split_linears_count_the_same_flops(tiny, monkeypatch):
    """A decoding step's linears (few rows) run as SPLIT-way batched matmuls: the same FLOPs."""
    monkeypatch.setattr(model, "SPLIT_MAX_ROWS", {torch.float32: 64})
    tokens = torch.randint(0, 300, (1, 10))
    split = measured(lambda: tiny(tokens))["Global"]
    ours = pf.count_forward(TINY, 10)
    assert "mm" not in split and split["bmm"] == linear_flops(ours) + attention_flops(ours)


def test_batch_padding_and_last_only(tiny):
    tokens = torch.randint(0, 300, (2, 12))
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1, :5] = False                                   # padded slots are computed all the same
    counts = measured(lambda: tiny(tokens, pad_mask=pad, last_only=True))["Global"]
    ours = pf.count_forward(TINY, 12, batch=2, last_only=True)
    assert counts == {"mm": linear_flops(ours), "bmm": attention_flops(ours)}
    assert ours["lm_head"]["macs"] == 2 * TINY.dim * TINY.vocab_size   # one row per sequence


def test_smollm2_config_on_meta_device():
    """The real SmolLM2-135M shape (30 layers, GQA 9/3 heads, tied head) without weights."""
    args = CONFIGS["smollm2-135m"]
    with torch.device("meta"):
        model = Llama(args)
    counts = measured(lambda: model(torch.zeros(2, 24, dtype=torch.long, device="meta")))["Global"]
    ours = pf.count_forward(args, 24, batch=2)
    assert counts == {"mm": linear_flops(ours), "bmm": attention_flops(ours)}


@pytest.mark.parametrize("args", [TINY, dataclasses.replace(CONFIGS["smollm2-135m"], n_layers=2)], ids=["tiny", "smollm2-2layers"])
def test_cached_forward_matches_flop_counter(args):
    torch.manual_seed(0)
    model = Llama(args).float().eval()
    cache = KVCache(args, 1, 32, torch.float32, "cpu")
    prefill = measured(lambda: model(torch.randint(0, 100, (1, 10)), cache))["Global"]
    step = measured(lambda: model(torch.randint(0, 100, (1, 5)), cache))["Global"]           # 5 after 10
    decode = measured(lambda: model(torch.randint(0, 100, (1, 1)), cache, last_only=True))["Global"]  # 1 after 15
    for got, (t_new, t_past, last) in zip((prefill, step, decode), ((10, 0, False), (5, 10, False), (1, 15, True))):
        ours = pf.count_forward(args, t_new, t_past, last_only=last)
        assert got == {"mm": linear_flops(ours), "bmm": attention_flops(ours)}, (t_new, t_past)
    # The linear part of 5 tokens after 10 is the difference of full forwards of 15 and 10 tokens; attention is
    # not (the cached step's rectangle 5 x 15 is not 15 x 15 - 10 x 10).
    full15 = measured(lambda: model(torch.randint(0, 100, (1, 15))))["Global"]
    assert step["mm"] == full15["mm"] - prefill["mm"]
    assert pf.count_forward(args, 5, 10)["macs_linear"] == \
        pf.count_forward(args, 15)["macs_linear"] - pf.count_forward(args, 10)["macs_linear"]
    assert step["bmm"] != full15["bmm"] - prefill["bmm"]


def test_lora_formula_on_a_hand_made_lora_linear():
    d_in, d_out, r, tokens = 48, 80, 4, 7
    base, a, b = nn.Linear(d_in, d_out, bias=False), nn.Linear(d_in, r, bias=False), nn.Linear(r, d_out, bias=False)
    x = torch.randn(1, tokens, d_in)
    unmerged = measured(lambda: base(x) + b(a(x)) * 2.0)["Global"]["mm"]
    assert unmerged == 2 * tokens * d_in * d_out + 2 * r * (d_in + d_out) * tokens
    merged = nn.Linear(d_in, d_out, bias=False)
    merged.weight.data = base.weight.data + 2.0 * b.weight.data @ a.weight.data
    assert measured(lambda: merged(x))["Global"]["mm"] == 2 * tokens * d_in * d_out   # merging adds nothing
    # the counter: 2 r (in + out) per token per adapted linear, summed over the seven targets; zero when merged
    c = pf.count_forward(TINY, tokens, lora_rank=r, lora_merged=False)
    shapes = pf.linear_shapes(TINY)
    assert c["layer"]["lora"]["flops"] == sum(2 * r * (i + o) * tokens for i, o in shapes.values())
    plain, merged_count = pf.count_forward(TINY, tokens), pf.count_forward(TINY, tokens, lora_rank=r, lora_merged=True)
    assert merged_count["macs"] == plain["macs"] and merged_count["flops"] == plain["flops"]
    assert c["macs"] - plain["macs"] == TINY.n_layers * r * tokens * sum(i + o for i, o in shapes.values())


def test_unmerged_lora_model_matches_flop_counter(tiny):
    x = torch.randint(0, 300, (1, 9))
    with pf.unmerged_lora(tiny, 8):
        wrapped = measured(lambda: tiny(x))["Global"]
        assert sum(isinstance(m, pf.UnmergedLoRA) for m in tiny.modules()) == 7 * TINY.n_layers
    ours = pf.count_forward(TINY, 9, lora_rank=8, lora_merged=False)
    assert wrapped == {"mm": linear_flops(ours), "bmm": attention_flops(ours)}
    assert not any(isinstance(m, pf.UnmergedLoRA) for m in tiny.modules())          # restored
    assert measured(lambda: tiny(x))["Global"]["mm"] == linear_flops(pf.count_forward(TINY, 9))


def test_hand_computed_counts():
    """dim 8, 2 heads of 4, 1 kv head, hidden 16, 1 layer, vocab 10; 3 new tokens after 2 cached (S = 5)."""
    args = ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, hidden_dim=16)
    c = pf.count_forward(args, 3, 2)
    # linears: q 3*8*8 + k 3*8*4 + v 3*8*4 + o 3*8*8 + (gate, up, down) 3 * 3*8*16 = 1728; QK^T and AV 2*3*5*4 each
    assert c["macs_attention"] == 240 and c["lm_head"]["macs"] == 3 * 8 * 10
    assert c["macs"] == 1728 + 240 + 240 and c["flops_matmul"] == 2 * 2208
    # rmsnorm 2*4*3*8, rotary 3*3*4*(2+1), softmax 5*2*3*5, swiglu 5*3*16, residual 2*3*8, final norm 4*3*8
    assert c["flops_elementwise"] == 192 + 108 + 150 + 240 + 48 + 96 == 834
    assert c["flops"] == 2 * 2208 + 834
    u = pf.count_forward(args, 3, 2, lora_rank=2, lora_merged=False)
    # LoRA: 3 tokens * 2 * (8+8 + 8+4 + 8+4 + 8+8 + 8+16 + 8+16 + 16+8); scale-and-add 2 * 3 * (8+4+4+8+16+16+8)
    assert u["macs"] - c["macs"] == 3 * 2 * 128 and u["flops_elementwise"] - c["flops_elementwise"] == 2 * 3 * 64


def test_llama3_sizes_are_sane():
    """Per-token linear MACs ~ the parameter count without embeddings (8.0B / 70.6B incl. the LM head)."""
    for name, params in (("llama3-8b", 7.50e9), ("llama3-70b", 69.5e9)):
        c = pf.count_forward(CONFIGS[name], 1)
        assert c["macs_linear"] == pytest.approx(params, rel=0.01)


def test_stand_in_compression_rule():
    assert pf.kept_positions(10, 0.3) == [0, 3, 6]
    assert pf.kept_positions(10, 0.7) == [0, 1, 2, 4, 5, 7, 8]
    assert len(pf.kept_positions(20, 0.7)) == 14                  # 0.7 * 20 = 14.000000000000002 in floats
    for n in range(1, 60):
        for rate in pf.KEEP_RATES:
            kept = pf.kept_positions(n, rate)
            assert kept[0] == 0 and len(set(kept)) == len(kept) == math.ceil(round(rate * n, 9))
    with pytest.raises(ValueError, match="keep-rate"):
        pf.kept_positions(10, 0)


def test_turn_plans_process_every_token_once():
    lengths = [(130, 5), (170, 4)]          # (chat up to the reply, reply tokens) per turn; 100 prompt tokens
    no_cache = pf.turn_calls(lengths, 100, cached=False)
    assert no_cache == [{"prefill": (130, 0), "decode": [(1, 130), (1, 131), (1, 132), (1, 133)]},
                        {"prefill": (170, 0), "decode": [(1, 170), (1, 171), (1, 172)]}]
    cached = pf.turn_calls(lengths, 100, cached=True)
    assert [t["prefill"] for t in cached] == [(30, 100), (36, 134)]
    processed = 100 + sum(t["prefill"][0] + len(t["decode"]) for t in cached)
    assert processed == 170 + 4 - 1        # each token of the chat once; the last reply token is never fed back


def test_shipped_conversation_replays_in_the_webshop_env():
    conv = pf.load_conversation(pf.CONVERSATION)
    assert len(conv) // 2 >= 5
    from agentbench_env.webshop import WebShopEnv, parse_action
    env = WebShopEnv()
    obs = env.reset(json.loads(pf.CONVERSATION.read_text())["goal_index"])
    for user, agent in zip(conv[0::2], conv[1::2]):
        assert user["content"] == obs and "Available Actions:" in obs
        assert agent["content"].startswith("Thought:\n") and parse_action(agent["content"]) is not None
        obs, done, score = env.step(agent["content"])
    assert done and score == 1.0


def test_bad_conversation_files(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}))
    with pytest.raises(pf.ConversationFileError, match=r"c.json: messages\[1\] must be a assistant"):
        pf.load_conversation(bad)
    bad.write_text("{not json")
    with pytest.raises(pf.ConversationFileError, match="not valid JSON"):
        pf.load_conversation(bad)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    with pytest.raises(pf.ConversationFileError, match="without an agent reply"):
        pf.load_conversation(bad)


def test_profile_analytic_with_a_tiny_tokenizer(tiny_dir, tmp_path):
    res = pf.main(["--config", "llama3-8b", "--model", str(tiny_dir), "--json", str(tmp_path / "p.json"),
                   "--no-plots", "--turns", "5"])
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["variants"] == res["variants"] and saved["latency_mode"] is None
    names = [v["name"] for v in res["variants"]]
    assert names == ["full prompt", "stand-in x0.9", "stand-in x0.7", "stand-in x0.3", "GenPI merged",
                     "GenPI unmerged r=16"]
    for setting in ("no_cache", "cached"):
        macs = [res[setting][n]["total"]["macs"] for n in names]
        assert macs[0] > macs[1] > macs[2] > macs[3] > macs[4] and macs[5] > macs[4]
        assert all(len(res[setting][n]["turns"]) == 5 for n in names)
    for n in names:   # caching never costs more, and each turn's reply is decoded the same way
        assert res["cached"][n]["total"]["macs"] < res["no_cache"][n]["total"]["macs"]
    full, genpi = res["variants"][0], res["variants"][4]
    # what is cached once: the prompt and the chat format's fixed start (here only the first user header)
    assert genpi["prompt_tokens"] == 0 and 0 < genpi["cached_prefix_tokens"] < 10
    assert full["cached_prefix_tokens"] == full["prompt_tokens"] + genpi["cached_prefix_tokens"]
    for v in (full, genpi):
        assert res["cached"][v["name"]]["prompt_caching"]["macs"] == \
            pf.count_forward(CONFIGS["llama3-8b"], v["cached_prefix_tokens"], last_only=True)["macs"]
    # without caching, a turn re-processes everything: turn 2's prefill is its whole chat
    n_chat = full["chat_and_reply_tokens"][1][0]
    assert res["no_cache"]["full prompt"]["turns"][1]["new_tokens"] == n_chat


def test_latency_fit_on_a_tiny_model(tiny_model, monkeypatch):
    model, tok = tiny_model
    # shapes far enough apart, and medians of 3, that the tiny model's times grow with the work even on
    # a fast CPU, where a forward of a few tokens is all overhead (8 vs 32 tokens fitted slopes of 0)
    monkeypatch.setattr(pf, "FIT_PREFILL", ((8, 0), (128, 0), (8, 128), (64, 64)))
    monkeypatch.setattr(pf, "FIT_DECODE", ((1, 8), (1, 128)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)               # as profile_flops.main times: two threads thrash on a shared CPU
    try:
        latency, info = pf.make_latency(model, "fit", 4, repeats=3, decode_steps=1)
    finally:
        torch.set_num_threads(threads)
    assert set(info) == {"prefill", "decode", "prefill unmerged LoRA", "decode unmerged LoRA"}
    conv = pf.load_conversation(pf.CONVERSATION)[:4]
    variants = [{"name": "genpi", "prefix": [], "lora_rank": 4, "lora_merged": False}]
    res = pf.profile(model.args, tok, conv, 2, variants, latency)
    turn = res["cached"]["genpi"]["turns"][0]
    # >= 0, not > 0: on a busy CPU two timed decode shapes can fit a negative slope, which predicts 0 s
    assert turn["prefill_s"] >= 0 and turn["decode_s"] >= 0 and turn["latency_s"] == turn["prefill_s"] + turn["decode_s"]
    assert turn["latency_s"] > 0
    assert not any(isinstance(m, pf.UnmergedLoRA) for m in model.modules())


def test_plots_are_optional(monkeypatch, tmp_path, capsys):
    res = {"variants": [{"name": "a"}], "no_cache": {}, "cached": {}}
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)     # import fails as if not installed
    assert pf.plot(res, 5, tmp_path, "t") == []
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_plots_written_when_matplotlib_is_installed(tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    _, tok = tiny_model
    conv = pf.load_conversation(pf.CONVERSATION)
    variants = pf.prompt_variants(pf.load_prompt("webshop"), tok)
    res = pf.profile(TINY, tok, conv, 3, variants)
    paths = pf.plot(res, 3, tmp_path, "tiny")
    assert [p.name for p in paths] == ["fig3_no_cache.png", "fig4_cached.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


@pytest.mark.slow
def test_paper_setting_with_the_embedded_tokenizer(smollm_path, tmp_path):
    """Section 8's conditions: a WebShop prompt of over 1,200 tokens, a conversation of more than 5 turns."""
    res = pf.main(["--config", "llama3-8b", "--no-plots", "--turns", "5"])
    full = res["variants"][0]
    assert full["prompt_tokens"] > 1200 and len(pf.load_conversation(pf.CONVERSATION)) // 2 > 5
    genpi, base = res["cached"]["GenPI merged"]["total"]["macs"], res["cached"]["full prompt"]["total"]["macs"]
    assert 0 < pf.saving(base, genpi) < 100


def test_latency_measure_on_a_tiny_model(tiny_model):
    model, tok = tiny_model
    conv = [{"role": "user", "content": "Observation: a page"}, {"role": "assistant", "content": "Action: click[a]"},
            {"role": "user", "content": "Observation: the next page"}, {"role": "assistant", "content": "Action: click[b]"}]
    variants = [{"name": "genpi", "prefix": [], "lora_rank": 4, "lora_merged": False},
                {"name": "prompted", "prefix": conv[:2], "lora_rank": 0, "lora_merged": True}]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        latency, info = pf.make_latency(model, "measure", 4, repeats=1, decode_steps=2)
        res = pf.profile(model.args, tok, conv, 2, variants, latency)
    finally:
        torch.set_num_threads(threads)
    assert info["mode"] == "measure"
    for name in ("genpi", "prompted"):
        for setting in ("no_cache", "cached"):
            for t in res[setting][name]["turns"]:
                assert t["prefill_s"] > 0 and t["decode_s"] > 0
    assert res["cached"]["prompted"]["prompt_caching"]["latency_s"] > 0
