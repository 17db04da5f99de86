"""Tests of agentbench_env/webshop.py: pages, actions and WebShop's reward on hand-computed cases."""
import importlib.util
import json
import os
import random

import pytest

from agentbench_env import webshop
from agentbench_env.webshop import WebShopEnv, get_reward, get_type_reward, parse_action, title_nouns


@pytest.fixture(scope="module")
def env():
    return WebShopEnv()


def act(action):
    return f"Thought:\nI think I should do this.\n\nAction:\n{action}"


def open_goal_product(env, i):
    """Search the goal's instruction, page to the goal product, open its item page."""
    goal = env.tasks[i]
    obs, done, _ = env.step(act(f"search[{goal['instruction_text']}]"))
    while goal["asin"].lower() not in env.clickables:
        obs, done, _ = env.step(act("click[Next >]"))
        assert not done
    return env.step(act(f"click[{goal['asin']}]"))


# ---------------------------------------------------------------------------------- episodes
def test_buying_goal_product_with_right_options_scores_one(env):
    for i in range(0, len(env.tasks), 10):
        env.reset(i)
        open_goal_product(env, i)
        for value in env.tasks[i]["goal_options"].values():
            obs, done, score = env.step(act(f"click[{value}]"))
            assert not done and score is None
        assert env.step(act("click[Buy Now]")) == (None, True, 1.0), env.info


def test_wrong_option_loses_exactly_one_share(env):
    i = next(k for k, g in enumerate(env.tasks) if len(g["goal_options"]) == 2)
    goal = env.tasks[i]
    product = env.products[goal["asin"]]
    (name0, want0), (name1, want1) = goal["goal_options"].items()
    wrong = next(v for v in product["options"][name0] if v != want0)
    env.reset(i)
    open_goal_product(env, i)
    env.step(act(f"click[{wrong}]"))
    env.step(act(f"click[{want1}]"))
    _, done, score = env.step(act("click[Buy Now]"))
    n_attr = len(goal["attributes"])
    assert done and score == pytest.approx((n_attr + 1 + 1) / (n_attr + 2 + 1))


def test_no_option_chosen_and_wrong_type(env):
    i = next(k for k, g in enumerate(env.tasks) if g["query"] == "eau de toilette")
    goal = env.tasks[i]
    env.reset(i)
    open_goal_product(env, i)
    _, _, score = env.step(act("click[Buy Now]"))  # attrs + price, no option
    n = len(goal["attributes"])
    assert score == pytest.approx((n + 1) / (n + len(goal["goal_options"]) + 1))
    env.reset(i)  # an hdmi cable shares no title noun with a fragrance: r_type = 0
    env.step(act("search[hdmi cable]"))
    asin = env.clickables[2]
    assert env.products[asin.upper()]["query"] == "hdmi cable"
    env.step(act(f"click[{asin}]"))
    assert env.step(act("click[Buy Now]"))[2] == 0.0
    assert env.info["r_type"] == 0.0


def test_invalid_reply_ends_with_zero_and_unknown_click_changes_nothing(env):
    first = env.reset(3)
    assert env.step("Thought: I will click buy now.") == (None, True, 0.0)
    assert env.info["reason"] == "invalid action"
    env.reset(3)
    assert env.step(act("click [Buy Now]")) == (None, True, 0.0)  # AgentBench regex: no space
    env.reset(3)
    assert env.step(act("click[Buy Now]")) == (first, False, None)  # not a clickable here
    with pytest.raises(RuntimeError):
        env.reset(3)
        env.step("no action")
        env.step(act("search[shoes]"))


def test_ten_rounds_at_most(env):
    env.reset(5)
    for _ in range(9):
        obs, done, score = env.step(act("click[nothing here]"))
        assert obs is not None and not done and score is None
    assert env.step(act("click[nothing here]")) == (None, True, 0.0)
    assert env.info["reason"] == "round limit"


# ---------------------------------------------------------------------------------- pages
def split_obs(obs):
    head, actions = obs.split("\n\nAvailable Actions:\n")
    assert head.startswith('Observation:\n"') and head.endswith('"')
    return head[len('Observation:\n"'):-1].split(" [SEP] "), json.loads(actions)


def test_search_page_text(env):
    obs = env.reset(0)
    instr = env.tasks[0]["instruction_text"]
    assert obs == (f'Observation:\n"WebShop [SEP] Instruction: [SEP] {instr} [SEP] Search"\n\n'
                   'Available Actions:\n{"has_search_bar": true, "clickables": ["search"]}')
    assert env.step(act("click[search]"))[0] == obs  # WebShop ignores a click on "search"


def test_results_pagination_and_back(env):
    env.reset(0)
    instr = env.tasks[0]["instruction_text"]
    page1, _, _ = env.step(act("search[long lasting eau de toilette]"))
    texts, actions = split_obs(page1)
    results = env.search("long lasting eau de toilette")
    assert len(results) > 20
    assert texts[:5] == ["Instruction:", instr, "Back to Search",
                         f"Page 1 (Total results: {len(results)})", "Next >"]
    assert texts[5::3] == results[:10]  # asin, title, price triples
    assert texts[6] == env.products[results[0]]["Title"]
    assert texts[7] == f"${env.products[results[0]]['price']:.2f}"
    assert actions == {"has_search_bar": False,
                       "clickables": ["back to search", "next >"] + [a.lower() for a in results[:10]]}
    texts2, actions2 = split_obs(env.step(act("click[Next >]"))[0])
    assert texts2[3:6] == [f"Page 2 (Total results: {len(results)})", "< Prev", "Next >"]
    assert texts2[6::3] == results[10:20]
    assert actions2["clickables"][:3] == ["back to search", "< prev", "next >"]
    assert env.step(act("click[< Prev]"))[0] == page1
    assert env.step(act("click[Back to Search]"))[0] == env.reset(0)


def test_item_and_sub_pages(env):
    env.reset(0)
    env.step(act("search[shampoo]"))
    asin = env.clickables[2].upper()
    p = env.products[asin]
    item, _, _ = env.step(act(f"click[{asin}]"))
    texts, actions = split_obs(item)
    option_texts = [t for name, values in p["options"].items() for t in [name] + values]
    assert texts == (["Instruction:", env.tasks[0]["instruction_text"], "Back to Search", "< Prev"]
                     + option_texts + [p["Title"], f"Price: ${p['price']:.2f}", f"Rating: {p['Rating']}",
                                       "Description", "Features", "Reviews", "Buy Now"])
    assert actions["clickables"] == (["back to search", "< prev", "description", "features", "reviews",
                                      "buy now"] + [v for vs in p["options"].values() for v in vs])
    assert split_obs(env.step(act("click[Description]"))[0])[0][3:] == ["< Prev", p["Description"]]
    assert env.step(act("click[< Prev]"))[0] == item
    assert split_obs(env.step(act("click[Features]"))[0])[0][4:] == p["BulletPoints"]
    env.step(act("click[< Prev]"))
    reviews = split_obs(env.step(act("click[Reviews]"))[0])[0][4:]
    expected = [t for r in p["Reviews"] for t in (f'"{r["title"]}"', str(r["score"]), r["body"])]
    assert reviews == (expected or ["No reviews found"])
    assert env.step(act("click[< Prev]"))[0] == item
    assert split_obs(env.step(act("click[< Prev]"))[0])[0][3].startswith("Page 1 (Total results:")


def test_search_finds_goal_product_for_most_instructions(env):
    top10 = [g["asin"] in env.search(g["instruction_text"])[:10] for g in env.tasks]
    rate = sum(top10) / len(top10)
    print(f"goal product in the top 10 for its instruction: {sum(top10)}/{len(top10)} = {rate:.1%}")
    assert rate >= 0.9


# ---------------------------------------------------------------------------------- reward parts
GOAL = dict(asin="B0TEST0001", query="eau de toilette", product_category="Beauty › Fragrance › EDT",
            name="Acme Long Lasting Eau De Toilette Spray", attributes=["long lasting", "cruelty free"],
            goal_options={"size": "3.4 fl oz", "scent": "lavender"}, price_upper=50.0,
            instruction_text="i need ...")


def product(**kw):
    p = dict(asin="B0TEST0002", Title="Brandx Eau De Toilette Spray", query="eau de toilette",
             product_category="Beauty › Fragrance › EDT", Attributes=["Long-Lasting"],
             BulletPoints=["Smells nice."], Description="A fragrance.")
    return dict(p, **kw)


def test_reward_hand_computed():
    # attrs: long lasting (fuzzy 100) yes, cruelty free no -> 1; options: size exact, scent fuzzy
    # ("Lavender " after processing) -> 2; price 45 <= 50 -> 1. (1 + 2 + 1) / (2 + 2 + 1) = 0.8
    r, info = get_reward(product(), GOAL, 45.0, {"size": "3.4 fl oz", "scent": "Lavender "})
    assert info["r_type"] == 1.0 and r == pytest.approx(4 / 5)
    # size is exact-match only ("3.4 oz" fails), price 60 > 50: (1 + 1 + 0) / 5
    r, _ = get_reward(product(), GOAL, 60.0, {"size": "3.4 oz", "scent": "lavender"})
    assert r == pytest.approx(2 / 5)
    # an attribute found in the description counts: (2 + 0 + 1) / 5
    r, _ = get_reward(product(Description="A cruelty free fragrance."), GOAL, 10.0, {})
    assert r == pytest.approx(3 / 5)
    # a chosen option value written in the title counts even if it is not the goal's (WebShop)
    r, _ = get_reward(product(Title="Brandx Eau De Toilette Spray Rose"), GOAL, 10.0, {"scent": "rose"})
    assert r == pytest.approx(3 / 5)


def test_type_reward_rules():
    # goal nouns: acme eau de toilette spray (5). Same query -> 1.0
    assert get_type_reward(product(), GOAL)["r_type"] == 1.0
    other = dict(query="shampoo", product_category="Beauty › Hair › Shampoo")
    # title 1/5 = 0.2 (not > 0.2), no query match, one shared category level -> 0.5
    t = get_type_reward(product(Title="Acme Shampoo", **other), GOAL)
    assert t["title_score"] == pytest.approx(0.2) and not t["category_match"] and t["r_type"] == 0.5
    # two shared category levels -> 1.0 even with a weak title
    t = get_type_reward(product(Title="Acme Shampoo", query="shampoo",
                                product_category="Beauty › Fragrance › Body Mist"), GOAL)
    assert t["category_match"] and t["r_type"] == 1.0
    # no shared noun -> 0; under 0.1 -> 0.1 whatever else matches
    assert get_type_reward(product(Title="Brandx Shampoo", **other), GOAL)["r_type"] == 0.0
    long_goal = dict(GOAL, name="Alpha Beta Gamma Delta Epsilon Zeta Eta Theta Iota Kappa Lambda Mu")
    t = get_type_reward(product(Title="Alpha Widget"), long_goal)
    assert t["title_score"] == pytest.approx(1 / 12) and t["r_type"] == 0.1


def test_title_nouns_heuristic():
    assert title_nouns("Lumiera Long Lasting Eau De Toilette Spray, for Women") == \
        ["lumiera", "eau", "de", "toilette", "spray", "women"]
    assert title_nouns("Acme 4K High Speed HDMI Cable, 6 Ft, Black") == ["acme", "speed", "hdmi", "cable", "ft"]
    assert title_nouns("Woolly Home Soft Throw Blanket, Cozy Throw") == ["home", "throw", "blanket", "throw"]
    assert title_nouns("Men's Lightweight Breathable Running Shoes") == ["men", "running", "shoes"]


def test_parse_action_agentbench_regex():
    assert parse_action("Thought:\nok\n\nAction:\nclick[Buy Now]") == ("click", "buy now")
    assert parse_action("action: search[Red Shoes < 50]") == ("search", "red shoes < 50")
    assert parse_action("Action:\n\n  click[b0abc] then Action: click[x]") == ("click", "b0abc")
    assert parse_action("Action: buy[it]") is None
    assert parse_action("click[Buy Now]") is None  # no "Action:" label
    assert parse_action(None) is None


# ---------------------------------------------------------------------------------- data files
def test_malformed_task_file_gives_one_clear_error(tmp_path):
    goals = json.load(open(webshop.GOALS_FILE))[:3]
    del goals[1]["price_upper"]
    path = tmp_path / "goals.json"
    path.write_text(json.dumps(goals))
    with pytest.raises(ValueError, match=r"task 1: missing field 'price_upper'"):
        WebShopEnv(tasks_file=str(path))
    path.write_text("[{]")
    with pytest.raises(ValueError, match="not valid JSON"):
        WebShopEnv(tasks_file=str(path))


def test_shipped_data_is_what_the_generator_makes():
    path = os.path.join(webshop.DATA_DIR, "make_webshop_data.py")
    spec = importlib.util.spec_from_file_location("make_webshop_data", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    products, goals = gen.make_webshop(random.Random(gen.SEED))
    assert products == json.load(open(webshop.PRODUCTS_FILE))
    assert goals == json.load(open(webshop.GOALS_FILE))
    assert len(products) >= 300 and len(goals) >= 100
    assert len({p["category"] for p in products}) >= 6
    steps = gen.make_mind2web(random.Random(gen.SEED))
    assert steps == json.load(open(os.path.join(webshop.DATA_DIR, "mind2web_steps.json")))
