"""Web Shopping: a local WebShop in AgentBench v0.2's text format (paper section 6.1, appendix B, figure 7).

A shop of products written for this project (data/webshop_products.json, made by
data/make_webshop_data.py) with WebShop's pages: search -> results (10 a page, `Next >` /
`< Prev`) -> item (options, Description, Features, Reviews, Buy Now) -> sub pages (`< Prev`).
Search is BM25 (bm25s) over title, description, features and option values, top 50 hits.

One user turn is the page text joined with " [SEP] ", then the available actions:

    Observation:
    "WebShop [SEP] Instruction: [SEP] i need ... [SEP] Search"

    Available Actions:
    {"has_search_bar": true, "clickables": ["search"]}

Choice: this is the turn exactly as the shots of figure 7 (and prompts/webshop.txt) show it:
page text in double quotes, actions as JSON. AgentBench's live turns print the page unquoted and
the actions as a Python dict repr ({'has_search_bar': True, ...}); we follow the shots so the
live turns look like the demonstrations. Clickables are lowercased (buttons, asins) as WebShop's
text env keys them; the click argument is lowercased before matching, so click[Buy Now] works.

The agent's action is taken by AgentBench's regex `[Aa]ction: *\\n* *((search|click)\\[.+?])`.
No match ends the episode with reward 0 (AGENT_VALIDATION_FAILED). A click on a value not in
the clickables changes nothing and the page is shown again (WebShop). search[...] works on any
page, as in WebShop's text env. 10 rounds at most; click[Buy Now] ends with the reward.

Reward = (|attrs matched| + |options matched| + [price <= limit]) / (|attrs| + |options| + 1) * r_type,
a port of WebShop's goal.get_reward (fuzzy matches with rapidfuzz token_set_ratio > 85 after
thefuzz's default processing). r_type uses the nouns of the titles; WebShop takes them with
spaCy's en_core_web_lg, which cannot be installed here, so title_nouns() approximates them: the
words of the title minus stopwords, numbers, a list of adjectives and adjective/adverb suffixes.
WebShop's normalize_color (a color-name canonicalizer before option matching) is not ported.

    env = WebShopEnv(); first = env.reset(0); obs, done, score = env.step("Action: search[...]")
"""
import json
import os
import re

import bm25s
import numpy as np
from rapidfuzz import fuzz, utils

from agentbench_env import load_records

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PRODUCTS_FILE = os.path.join(DATA_DIR, "webshop_products.json")
GOALS_FILE = os.path.join(DATA_DIR, "webshop_goals.json")
MAX_ROUNDS = 10  # AgentBench v0.2
SEARCH_RETURN_N = 50  # WebShop engine.py
PRODUCT_WINDOW = 10
ACTION_RE = re.compile(r"[Aa]ction: *\n* *((search|click)\[.+?])")  # AgentBench webshop task.py
SUB_PAGES = ("description", "features", "reviews")
EXACT_MATCH_OPTS = ["size"]  # WebShop goal.py
GOAL_FIELDS = {"asin": str, "instruction_text": str, "attributes": list, "goal_options": (dict, list),
               "price_upper": (int, float), "query": str, "product_category": str, "name": str}
PRODUCT_FIELDS = {"asin": str, "Title": str, "product_category": str, "query": str,
                  "price": (int, float), "Attributes": list, "options": dict, "Description": str,
                  "BulletPoints": list, "Reviews": list, "Rating": (int, float, str)}


# ---------------------------------------------------------------------------------- search
STOPWORDS = set(bm25s.stopwords.STOPWORDS_EN)  # Lucene's English stop set, as pyserini uses


def tokenize(text):
    """Lowercase words minus stopwords and possessives, with plurals folded (a tiny stemmer)."""
    words = re.findall(r"[a-z0-9]+", text.lower().replace("'s", ""))
    out = []
    for w in words:
        if w in STOPWORDS:
            continue
        if len(w) > 4 and w.endswith("ies"):
            w = w[:-3] + "y"
        elif len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.append(w)
    return out


def product_text(p):
    options = ", and ".join(f"{k}: {', '.join(v)}" for k, v in p["options"].items())
    return " ".join([p["Title"], p["Description"], " ".join(p["BulletPoints"]), options])


def build_index(products):
    retriever = bm25s.BM25()
    retriever.index([tokenize(product_text(p)) for p in products], show_progress=False)
    return retriever


def search(retriever, asins, keywords):
    """Asins of the top SEARCH_RETURN_N products with a positive BM25 score, best first."""
    tokens = [t for t in tokenize(keywords) if t in retriever.vocab_dict]
    if not tokens:
        return []
    scores = retriever.get_scores(tokens)  # (n_products,)
    order = np.argsort(-scores, kind="stable")[:SEARCH_RETURN_N]
    return [asins[i] for i in order if scores[i] > 0]


# ---------------------------------------------------------------------------------- reward
ADJECTIVES = set("""
non free long lasting fresh soft light lightweight natural organic dark rich high low quick dry
fast slim compact portable waterproof new premium classic daily everyday casual warm cozy bold
creamy glossy healthy gourmet protective rugged basic athletic outdoor indoor ergonomic external
hot iced small large medium big mini little extra best great good fine pure gentle sensitive
black white red blue green pink grey gray navy olive brown beige tan gold silver yellow orange
purple maroon teal cream charcoal clear nude coral mauve berry ruby rose burgundy sage taupe
raised single double smart loose whole mixed roasted salted unsalted wireless braided easy short
faux lazy
""".split())
ADJ_SUFFIXES = ("ly", "ful", "less", "ous", "able", "ible", "ive", "ish")
NOUN_EXCEPTIONS = {"olive", "drive", "table", "cable", "family", "jelly", "belly", "bible", "hive"}


def title_nouns(title):
    """Approximate spaCy's NOUN/PROPN tokens of a product title (WebShop's get_type_reward)."""
    words = re.findall(r"[a-z][a-z'-]*", title.lower().replace("'s", ""))
    nouns = []
    for w in words:
        if w in STOPWORDS or w in ADJECTIVES or len(w) < 2:
            continue
        if w.endswith(ADJ_SUFFIXES) and w not in NOUN_EXCEPTIONS:
            continue
        nouns.append(w)
    return nouns


def get_type_reward(purchased, goal):
    """WebShop goal.get_type_reward: 1.0, 0.5, 0.1 or 0 from query, category and title match."""
    query_match = purchased["query"] == goal["query"]
    purchased_cat = [x.strip() for x in purchased["product_category"].split("›")]
    goal_cat = [x.strip() for x in goal["product_category"].split("›")]
    category_match = len(set(purchased_cat) & set(goal_cat)) >= 2
    purchased_type = title_nouns(purchased["Title"])
    desired_type = title_nouns(goal["name"])
    n_intersect = len(set(purchased_type) & set(desired_type))
    title_score = 0.2 if len(desired_type) == 0 else n_intersect / len(desired_type)
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return dict(r_type=r_type, query_match=query_match, category_match=category_match,
                title_score=title_score)


def fuzzy(a, b):
    """thefuzz.fuzz.token_set_ratio (which lowercases and strips punctuation first)."""
    return fuzz.token_set_ratio(a, b, processor=utils.default_process)


def in_product_text(value, p):
    return (value in p["Title"].lower() or value in " ".join(p["BulletPoints"]).lower()
            or value in p["Description"].lower())


def get_attribute_reward(purchased, goal):
    """WebShop: a goal attribute matches a product attribute (fuzzy > 85) or appears in its text."""
    n = 0
    for g_attr in goal["attributes"]:
        if any(fuzzy(p_attr, g_attr) > 85 for p_attr in purchased["Attributes"]) or \
                in_product_text(g_attr, purchased):
            n += 1
    return n / len(goal["attributes"]), n


def get_option_reward(purchased, goal_options, purchased_options):
    """WebShop: each chosen option matches a goal option (exact for size, else fuzzy > 85) or
    appears in the product's text."""
    n = 0
    for name, value in purchased_options.items():
        if name.lower() in EXACT_MATCH_OPTS:
            matched = value in goal_options
        else:
            matched = any(fuzzy(g, value) > 85 for g in goal_options)
        if matched or in_product_text(value, purchased):
            n += 1
    return (n / len(goal_options) if goal_options else None), n


def get_reward(purchased, goal, price, options):
    """WebShop goal.get_reward -> (reward, info)."""
    type_info = get_type_reward(purchased, goal)
    r_price = price <= goal["price_upper"] if goal["price_upper"] > 0 else None
    _, n_attr = get_attribute_reward(purchased, goal)
    goal_options = goal["goal_options"]  # {name: value} or, in WebShop's human goals, [value]
    goal_options = list(goal_options.values()) if isinstance(goal_options, dict) else goal_options
    _, n_opt = get_option_reward(purchased, goal_options, options)
    total = (n_attr + n_opt + r_price) / (len(goal["attributes"]) + len(goal_options) + 1)
    info = dict(type_info, n_attr=n_attr, n_opt=n_opt, r_price=r_price)
    return total * type_info["r_type"], info


# ---------------------------------------------------------------------------------- pages
def render(state, goal, products):
    """Page texts, clickables and has_search_bar of the current page, as WebShop's text mode."""
    head = ["Instruction:", goal["instruction_text"], "Back to Search"]
    page = state["page"]
    if page == "search":
        return ["WebShop", "Instruction:", goal["instruction_text"], "Search"], ["search"], True
    if page == "results":
        n, p = len(state["results"]), state["page_num"]
        texts, clicks = head + [f"Page {p} (Total results: {n})"], ["back to search"]
        if p > 1:
            texts, clicks = texts + ["< Prev"], clicks + ["< prev"]
        if p * PRODUCT_WINDOW < n:
            texts, clicks = texts + ["Next >"], clicks + ["next >"]
        for asin in state["results"][(p - 1) * PRODUCT_WINDOW:p * PRODUCT_WINDOW]:
            texts += [asin, products[asin]["Title"], f"${products[asin]['price']:.2f}"]
            clicks.append(asin.lower())
        return texts, clicks, False
    prod = products[state["asin"]]
    clicks = ["back to search", "< prev"]
    if page == "item":
        texts = head + ["< Prev"]
        for name, values in prod["options"].items():
            texts += [name] + values
        texts += [prod["Title"], f"Price: ${prod['price']:.2f}", f"Rating: {prod['Rating']}",
                  "Description", "Features", "Reviews", "Buy Now"]
        clicks += ["description", "features", "reviews", "buy now"]
        clicks += [v for values in prod["options"].values() for v in values]
        return texts, clicks, False
    if page == "description":
        return head + ["< Prev", prod["Description"]], clicks, False
    if page == "features":
        return head + ["< Prev"] + prod["BulletPoints"], clicks, False
    reviews = [t for r in prod["Reviews"] for t in (f'"{r["title"]}"', str(r["score"]), r["body"])]
    return head + ["< Prev"] + (reviews or ["No reviews found"]), clicks, False


def format_observation(texts, clickables, has_search_bar):
    actions = json.dumps({"has_search_bar": has_search_bar, "clickables": clickables}, ensure_ascii=False)
    return f'Observation:\n"{" [SEP] ".join(texts)}"\n\nAvailable Actions:\n{actions}'


def parse_action(reply):
    """AgentBench: the first `Action: search[...]` / `click[...]` -> (name, arg), else None."""
    m = ACTION_RE.search(reply or "")
    if m is None:
        return None
    name, arg = re.match(r"(search|click)\[(.+)\]", m.group(1), re.DOTALL).groups()
    return name, arg.lower()


def apply_click(state, arg, products):
    """WebShop SimServer.receive for a click on a valid clickable; returns True when bought."""
    page = state["page"]
    if arg == "buy now":
        return True
    if arg == "back to search":
        state.update(page="search", results=[], page_num=1, asin=None, options={})
    elif arg == "next >" and page == "results":
        state.update(page_num=state["page_num"] + 1, options={})
    elif arg == "< prev" and page == "results":
        state.update(page_num=state["page_num"] - 1, options={})
    elif arg == "< prev" and page in SUB_PAGES:
        state["page"] = "item"
    elif arg == "< prev" and page == "item":
        state.update(page="results", options={})
    elif arg in SUB_PAGES:
        state["page"] = arg
    elif page == "results":  # a product link
        state.update(page="item", asin=arg.upper())
    else:  # an option of the item page
        name = next(k for k, vs in products[state["asin"]]["options"].items() if arg in vs)
        state["options"][name] = arg
    return False


class WebShopEnv:
    """tasks: WebShop goals. reset(i) -> first user turn; step(reply) -> (obs | None, done, score | None)."""

    def __init__(self, tasks_file=None, products_file=None):
        tasks_file = tasks_file or GOALS_FILE
        products_file = products_file or PRODUCTS_FILE
        self.tasks = load_records(tasks_file, GOAL_FIELDS, "task")
        catalog = load_records(products_file, PRODUCT_FIELDS, "product")
        self.products = {p["asin"]: p for p in catalog}
        self.asins = [p["asin"] for p in catalog]
        self.retriever = build_index(catalog)
        self.goal, self.state, self.info = None, None, None

    def search(self, keywords):
        return search(self.retriever, self.asins, keywords)

    def reset(self, i):
        self.goal = self.tasks[i]
        self.state = dict(page="search", results=[], page_num=1, asin=None, options={})
        self.rounds, self.done, self.info = 0, False, None
        self.clickables = ["search"]
        return self.observe()

    def observe(self):
        texts, self.clickables, has_bar = render(self.state, self.goal, self.products)
        return format_observation(texts, self.clickables, has_bar)

    def step(self, reply):
        if self.state is None or self.done:
            raise RuntimeError("WebShopEnv.step called before reset() or after the episode ended")
        self.rounds += 1
        action = parse_action(reply)
        if action is None:
            return self.finish(0.0, "invalid action")
        name, arg = action
        if name == "search":
            results = self.search(arg)
            self.state.update(page="results", results=results, page_num=1, asin=None, options={})
        elif arg in self.clickables and arg != "search":
            if apply_click(self.state, arg, self.products):
                prod = self.products[self.state["asin"]]
                reward, info = get_reward(prod, self.goal, prod["price"], self.state["options"])
                return self.finish(reward, "bought", info)
        if self.rounds >= MAX_ROUNDS:
            return self.finish(0.0, "round limit")
        return self.observe(), False, None

    def finish(self, score, reason, info=None):
        self.done = True
        self.info = dict(info or {}, reason=reason, rounds=self.rounds)
        return None, True, float(score)
