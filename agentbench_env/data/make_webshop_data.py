"""Write the shipped data of the two web environments (paper section 6.1, appendix B).

Web Shopping: a product catalog in WebShop's product format (asin, Title, product_category,
query, Price, Attributes, options, Description, BulletPoints, Reviews) and goals in WebShop's
goal format (instruction_text, attributes, goal_options, price_upper, ...), built from the
hand-written pieces below. Goal prices follow WebShop's goal.py: the upper limit is the larger of
two multiples of 10 drawn from the four just above the product's price.

Web Browsing: Mind2Web-style multiple-choice steps (simplified HTML, task, previous actions,
choices A..F), built from hand-written site templates; about one step in six has its right
element pruned from the page, so its answer is A ("None of the above").

Everything is written for this project and is deterministic (seeded). Run from the repo root:
    python agentbench_env/data/make_webshop_data.py
"""
import itertools
import json
import os
import random

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
SEED = 0
PRODUCTS_PER_TYPE = 12
N_GOALS = 150
PRICE_RANGE = [10.0 * i for i in range(1, 100)]  # WebShop goal.py

# ----------------------------------------------------------------------------------------------
# Web Shopping catalog: (category, product_category, query, noun shown in titles and goals,
# title suffixes, brands, attribute pool, options {name: values}, option phrase per name, price)
TYPES = [
    dict(category="beauty", path="Beauty & Personal Care › Fragrance › Women's › Eau de Toilette",
         query="eau de toilette", noun="eau de toilette spray",
         suffixes=["for Women", "Floral Fragrance", "Fresh Perfume"],
         brands=["Verdane", "Lumiera", "Solenne", "Amberly", "Maison Rive", "Celestia"],
         attributes=["long lasting", "cruelty free", "travel size", "paraben free", "vegan"],
         options={"size": ["1 fl oz", "1.7 fl oz", "3.4 fl oz", "6.76 fl oz (pack of 1)"]},
         price=(18, 95)),
    dict(category="beauty", path="Beauty & Personal Care › Hair Care › Shampoo & Conditioner › Shampoos",
         query="shampoo", noun="shampoo",
         suffixes=["for Dry Hair", "Daily Cleansing Formula", "Salon Formula"],
         brands=["Hairloom", "Puretress", "Botanica Lane", "Silkwell", "Nord Spa", "Curlcraft"],
         attributes=["sulfate free", "paraben free", "color safe", "tea tree oil", "natural ingredients"],
         options={"size": ["8 fl oz", "12 fl oz", "16 fl oz", "33.8 fl oz"],
                  "scent": ["coconut", "lavender", "mint", "unscented"]},
         price=(7, 32)),
    dict(category="beauty", path="Beauty & Personal Care › Skin Care › Face › Moisturizers",
         query="face moisturizer", noun="face moisturizer cream",
         suffixes=["for Sensitive Skin", "Daily Hydration", "Lightweight Lotion"],
         brands=["Dermalux", "Clearwell", "Aquaveil", "Skinsong", "Velvetine", "Oat & Honey"],
         attributes=["fragrance free", "hyaluronic acid", "non greasy", "spf 30", "dermatologist tested"],
         options={"size": ["1 oz", "1.7 oz", "2.5 oz"]},
         price=(9, 48)),
    dict(category="beauty", path="Beauty & Personal Care › Makeup › Lips › Lipstick",
         query="lipstick", noun="lipstick",
         suffixes=["Creamy Lip Color", "Bold Lip Makeup", "Everyday Lip Shade"],
         brands=["Rougette", "Kissmark", "Velvet Pout", "Cherie", "Lustra", "Bloomlip"],
         attributes=["long lasting", "matte finish", "cruelty free", "vegan", "moisturizing"],
         options={"color": ["ruby red", "nude", "berry", "coral", "mauve", "classic pink"]},
         price=(6, 28)),
    dict(category="beauty", path="Beauty & Personal Care › Foot, Hand & Nail Care › Nail Polish",
         query="nail polish", noun="nail polish",
         suffixes=["Quick Dry Lacquer", "Salon Nail Color", "Glossy Nail Lacquer"],
         brands=["Lacquerie", "Tipsy Tips", "Polished Co", "Gloss Theory", "Nailsmith", "Dotty"],
         attributes=["quick dry", "non toxic", "chip resistant", "high shine", "vegan"],
         options={"color": ["cherry red", "ballet pink", "midnight blue", "sage green", "glitter gold"],
                  "size": ["0.5 fl oz", "0.5 fl oz (pack of 3)"]},
         price=(5, 24)),
    dict(category="grocery", path="Grocery & Gourmet Food › Snacks & Sweets › Chocolate › Bars",
         query="dark chocolate bar", noun="dark chocolate bar",
         suffixes=["70% Cacao", "Gourmet Snack Bar", "Rich Cocoa Treat"],
         brands=["Cacaoza", "Bittersweet Lane", "Theobroma Co", "Noir & Co", "Cocoa Ridge", "Alpina"],
         attributes=["gluten free", "non gmo", "low sugar", "fair trade", "vegan"],
         options={"flavor": ["sea salt", "mint", "orange", "almond", "raspberry"],
                  "size": ["3 ounce (pack of 6)", "3 ounce (pack of 12)"]},
         price=(9, 45)),
    dict(category="grocery", path="Grocery & Gourmet Food › Beverages › Tea › Green Tea",
         query="green tea", noun="green tea bags",
         suffixes=["Loose Leaf Blend", "Premium Tea", "Hot or Iced Tea"],
         brands=["Jade Leaf Garden", "Teavana Hills", "Misty Peak", "Zen Kettle", "Sencha House", "Leafwise"],
         attributes=["organic", "individually wrapped", "non gmo", "decaffeinated", "kosher"],
         options={"flavor": ["jasmine", "mint", "lemon ginger", "original"],
                  "size": ["20 count", "40 count", "100 count"]},
         price=(5, 30)),
    dict(category="grocery", path="Grocery & Gourmet Food › Snacks & Sweets › Snack Bars › Protein Bars",
         query="protein bar", noun="protein bars",
         suffixes=["Healthy Snack", "Post Workout Snack", "Meal Replacement Bar"],
         brands=["Fuelcraft", "Musclebite", "Trailmix Labs", "Kinetic Eats", "Powerleaf", "Gritbar"],
         attributes=["high protein", "gluten free", "low carb", "keto friendly", "no artificial sweeteners"],
         options={"flavor": ["peanut butter", "chocolate chip", "cookie dough", "birthday cake"],
                  "size": ["12 count", "24 count"]},
         price=(14, 48)),
    dict(category="grocery", path="Grocery & Gourmet Food › Beverages › Coffee › Whole Coffee Beans",
         query="coffee beans", noun="whole bean coffee",
         suffixes=["Roasted Coffee", "Barista Blend", "Small Batch Roast"],
         brands=["Roastery Nine", "Highland Bean", "Morning Ritual", "Crema Valley", "Dark Horse Coffee", "Sol Roasters"],
         attributes=["fair trade", "organic", "single origin", "low acid", "kosher"],
         options={"flavor": ["colombian", "french roast", "breakfast blend", "hazelnut"],
                  "size": ["12 ounce", "2 pound", "5 pound"]},
         price=(10, 60)),
    dict(category="grocery", path="Grocery & Gourmet Food › Pantry Staples › Nuts & Seeds › Mixed Nuts",
         query="mixed nuts", noun="mixed nuts",
         suffixes=["Snack Pack", "Party Snack", "Healthy Snack Mix"],
         brands=["Nutworth", "Orchard Crunch", "Kernel King", "Harvest Hollow", "Pecan Point", "Snackery"],
         attributes=["unsalted", "dry roasted", "resealable bag", "non gmo", "gluten free"],
         options={"size": ["16 ounce", "24 ounce", "40 ounce"]},
         price=(8, 38)),
    dict(category="electronics", path="Electronics › Cell Phones & Accessories › Chargers & Power Adapters › Wall Chargers",
         query="usb c charger", noun="usb c wall charger",
         suffixes=["Power Adapter", "Travel Charger Block", "PD Charger"],
         brands=["Voltra", "Ampwise", "ChargeLab", "Plugstar", "Nexvolt", "Juicebox"],
         attributes=["fast charging", "foldable plug", "overheat protection", "compact design", "gan technology"],
         options={"color": ["black", "white"], "style": ["20w", "30w", "65w"]},
         price=(9, 55)),
    dict(category="electronics", path="Electronics › Cell Phones & Accessories › Cases, Holsters & Sleeves › Basic Cases",
         query="phone case", noun="phone case",
         suffixes=["Protective Cover", "Slim Bumper Case", "Rugged Case"],
         brands=["Armorly", "Casewise", "Shellguard", "Bumpr", "Clarity Case", "Tuffskin"],
         attributes=["shockproof", "wireless charging compatible", "slim fit", "raised edges", "anti yellowing"],
         options={"color": ["black", "clear", "navy blue", "pink", "forest green"],
                  "size": ["iphone 14", "iphone 15", "galaxy s23"]},
         price=(7, 35)),
    dict(category="electronics", path="Electronics › Headphones, Earbuds & Accessories › Earbuds",
         query="wireless earbuds", noun="wireless earbuds",
         suffixes=["Bluetooth Headphones", "In Ear Headphones", "Sport Earphones"],
         brands=["Sonique", "Beatlane", "Auralis", "Podwave", "Echobud", "Quietbay"],
         attributes=["noise cancelling", "water resistant", "long battery life", "bluetooth 5.3", "charging case"],
         options={"color": ["black", "white", "blue", "rose gold"]},
         price=(19, 149)),
    dict(category="electronics", path="Electronics › Computers & Accessories › Cables & Accessories › HDMI Cables",
         query="hdmi cable", noun="hdmi cable",
         suffixes=["High Speed Cord", "for TV and Monitor", "Gaming Cable"],
         brands=["Linkstream", "Cablecraft", "Signalpro", "Wirewell", "Portline", "Ultralink"],
         attributes=["4k", "braided", "gold plated", "high speed", "ethernet channel"],
         options={"size": ["3 ft", "6 ft", "10 ft", "15 ft"]},
         price=(6, 29)),
    dict(category="electronics", path="Electronics › Cell Phones & Accessories › Portable Power Banks",
         query="power bank", noun="portable power bank",
         suffixes=["Battery Pack", "External Battery", "Phone Charger"],
         brands=["Voltra", "Ampwise", "Powercell", "Charge Nomad", "Batteria", "Lumen Power"],
         attributes=["fast charging", "led display", "usb c", "compact design", "airline approved"],
         options={"size": ["10000mah", "20000mah", "26800mah"], "color": ["black", "white", "blue"]},
         price=(15, 79)),
    dict(category="electronics", path="Electronics › Computers & Accessories › Laptop Accessories › Stands",
         query="laptop stand", noun="laptop stand",
         suffixes=["Desk Riser", "Ergonomic Holder", "Notebook Stand"],
         brands=["Deskly", "Elevate Works", "Perchpro", "Ergomate", "Tiltworks", "Alumo"],
         attributes=["adjustable height", "aluminum", "foldable", "ventilated", "non slip"],
         options={"color": ["silver", "space gray", "black"]},
         price=(16, 69)),
    dict(category="fashion", path="Clothing, Shoes & Jewelry › Men › Clothing › Shirts › T-Shirts",
         query="men t-shirt", noun="men's t-shirt",
         suffixes=["Crew Neck Tee", "Everyday Tee", "Basic Top"],
         brands=["Threadline", "Cotton Harbor", "Basecamp Apparel", "Urbanweave", "Northfold", "Kinfolk Tees"],
         attributes=["cotton", "machine wash", "short sleeve", "relaxed fit", "tagless"],
         options={"color": ["black", "white", "heather grey", "navy", "olive"],
                  "size": ["small", "medium", "large", "x-large", "xx-large"]},
         price=(8, 35)),
    dict(category="fashion", path="Clothing, Shoes & Jewelry › Women › Clothing › Active › Leggings",
         query="yoga leggings", noun="women's yoga leggings",
         suffixes=["Workout Pants", "Athletic Tights", "Running Leggings"],
         brands=["Flexa", "Lotus Motion", "Stride & Flow", "Zenfit", "Pulse Active", "Aurora Athletics"],
         attributes=["high waist", "tummy control", "moisture wicking", "four way stretch", "side pockets"],
         options={"color": ["black", "charcoal", "navy", "wine red", "dusty pink"],
                  "size": ["x-small", "small", "medium", "large", "x-large"]},
         price=(14, 45)),
    dict(category="fashion", path="Clothing, Shoes & Jewelry › Men › Clothing › Fashion Hoodies & Sweatshirts",
         query="hoodie", noun="pullover hoodie",
         suffixes=["Hooded Sweatshirt", "Casual Hoodie", "Warm Sweatshirt"],
         brands=["Threadline", "Hearthwear", "Summit Cotton", "Drift Supply", "Northfold", "Cozyfield"],
         attributes=["fleece lined", "machine wash", "kangaroo pocket", "drawstring hood", "cotton blend"],
         options={"color": ["black", "heather grey", "navy", "maroon", "forest green"],
                  "size": ["small", "medium", "large", "x-large"]},
         price=(19, 59)),
    dict(category="fashion", path="Clothing, Shoes & Jewelry › Women › Clothing › Coats, Jackets & Vests › Rain Jackets",
         query="rain jacket", noun="women's rain jacket",
         suffixes=["Windbreaker", "Outdoor Raincoat", "Lightweight Shell"],
         brands=["Drizzle Co", "Cloudburst", "Trailhead Outfitters", "Puddle & Pine", "Stormline", "Brisa"],
         attributes=["waterproof", "hooded", "packable", "lightweight", "zipper pockets"],
         options={"color": ["black", "navy", "yellow", "olive", "red"],
                  "size": ["small", "medium", "large", "x-large"]},
         price=(25, 89)),
    dict(category="fashion", path="Clothing, Shoes & Jewelry › Men › Clothing › Socks › Athletic Socks",
         query="athletic socks", noun="athletic socks",
         suffixes=["Crew Socks", "Running Socks", "Ankle Socks"],
         brands=["Footloom", "Stridewell", "Sockery", "Cushion Co", "Heel & Toe", "Pacer"],
         attributes=["moisture wicking", "cushioned", "arch support", "breathable", "reinforced heel"],
         options={"color": ["white", "black", "grey", "assorted"],
                  "size": ["medium (pack of 6)", "large (pack of 6)", "large (pack of 12)"]},
         price=(9, 32)),
    dict(category="shoes", path="Clothing, Shoes & Jewelry › Men › Shoes › Athletic › Running",
         query="running shoes", noun="men's running shoes",
         suffixes=["Road Runner", "Athletic Sneakers", "Training Shoes"],
         brands=["Stridex", "Velocita", "Trackline", "Peakrun", "Swiftsole", "Fleetfoot"],
         attributes=["lightweight", "breathable mesh", "rubber sole", "non slip", "cushioned insole"],
         options={"color": ["black white", "grey", "navy blue", "red", "all black"],
                  "size": ["8", "9", "9.5", "10", "11", "12"]},
         price=(35, 130)),
    dict(category="shoes", path="Clothing, Shoes & Jewelry › Women › Shoes › Slippers",
         query="women slippers", noun="women's slippers",
         suffixes=["House Shoes", "Cozy Slip On", "Bedroom Slippers"],
         brands=["Cozystep", "Hearth & Heel", "Plushwalk", "Snugglers", "Dreamtoe", "Lazy Sunday"],
         attributes=["memory foam", "non slip", "indoor outdoor", "machine washable", "faux fur"],
         options={"color": ["grey", "pink", "beige", "black", "burgundy"],
                  "size": ["5-6", "7-8", "9-10", "11-12"]},
         price=(12, 45)),
    dict(category="shoes", path="Clothing, Shoes & Jewelry › Women › Shoes › Outdoor › Hiking Boots",
         query="hiking boots", noun="women's hiking boots",
         suffixes=["Trail Boots", "Mid Rise Boots", "Trekking Boots"],
         brands=["Ridgeback", "Summitra", "Trailforge", "Granite Step", "Alpenway", "Mossrock"],
         attributes=["waterproof", "ankle support", "rubber sole", "lace up", "lightweight"],
         options={"color": ["brown", "grey", "black", "taupe"],
                  "size": ["6", "7", "7.5", "8", "9", "10"]},
         price=(45, 160)),
    dict(category="shoes", path="Clothing, Shoes & Jewelry › Women › Shoes › Sandals › Flat Sandals",
         query="women sandals", noun="women's flat sandals",
         suffixes=["Summer Sandals", "Casual Slides", "Beach Sandals"],
         brands=["Solstice", "Seabreeze Soles", "Palmwalk", "Sunny Strap", "Coastline", "Marisol"],
         attributes=["arch support", "open toe", "adjustable strap", "cushioned footbed", "non slip"],
         options={"color": ["tan", "black", "white", "gold", "rose"],
                  "size": ["6", "7", "8", "9", "10"]},
         price=(15, 60)),
    dict(category="home", path="Home & Kitchen › Kitchen & Dining › Cookware › Pots & Pans › Skillets",
         query="frying pan", noun="frying pan",
         suffixes=["Skillet", "Omelette Pan", "Saute Pan"],
         brands=["Hearthstone", "Panmaster", "Copperline", "Cookwell", "Forge & Flame", "Ironleaf"],
         attributes=["non stick", "dishwasher safe", "oven safe", "induction compatible", "easy to clean"],
         options={"size": ["8 inch", "10 inch", "12 inch"]},
         price=(15, 89)),
    dict(category="home", path="Home & Kitchen › Bath › Towels › Bath Towels",
         query="bath towels", noun="bath towel set",
         suffixes=["Towels for Bathroom", "Spa Towels", "Hotel Quality Towels"],
         brands=["Plushloom", "Cottonwell", "Spa Haven", "Terrycloth Co", "Linen Lane", "Softshore"],
         attributes=["cotton", "quick dry", "highly absorbent", "machine washable", "oeko tex certified"],
         options={"color": ["white", "grey", "navy", "sage", "charcoal"],
                  "size": ["4 piece set", "6 piece set", "8 piece set"]},
         price=(19, 75)),
    dict(category="home", path="Home & Kitchen › Bedding › Bed Pillows & Positioners › Bed Pillows",
         query="bed pillow", noun="memory foam pillow",
         suffixes=["for Side Sleepers", "Bed Pillow", "Sleeping Pillow"],
         brands=["Dreamcloud", "Restwell", "Nightfall", "Slumberly", "Pillowy", "Moonrest"],
         attributes=["hypoallergenic", "cooling gel", "washable cover", "adjustable loft", "neck support"],
         options={"size": ["standard", "queen", "king"], "style": ["single", "2 pack"]},
         price=(19, 79)),
    dict(category="home", path="Home & Kitchen › Kitchen & Dining › Storage & Organization › Water Bottles",
         query="water bottle", noun="insulated water bottle",
         suffixes=["Stainless Steel Bottle", "Sports Bottle", "Travel Flask"],
         brands=["Hydrava", "Frostline", "Aquapeak", "Summit Sip", "Chillwell", "Vessel & Co"],
         attributes=["bpa free", "leak proof", "dishwasher safe", "keeps cold 24 hours", "wide mouth"],
         options={"color": ["black", "white", "teal", "lilac", "silver"],
                  "size": ["18 oz", "24 oz", "32 oz", "40 oz"]},
         price=(12, 45)),
    dict(category="home", path="Home & Kitchen › Bedding › Blankets & Throws › Throws",
         query="throw blanket", noun="throw blanket",
         suffixes=["for Couch", "Sofa Blanket", "Cozy Throw"],
         brands=["Hearthwarm", "Cuddle Co", "Woolly Home", "Snugnest", "Fireside", "Plaidworks"],
         attributes=["soft", "machine washable", "lightweight", "sherpa lined", "fade resistant"],
         options={"color": ["cream", "grey", "mustard", "navy", "blush pink"],
                  "size": ["50 x 60 inch", "60 x 80 inch"]},
         price=(15, 59)),
    dict(category="home", path="Home & Kitchen › Home Décor › Candles & Holders › Candles › Jar Candles",
         query="scented candle", noun="scented jar candle",
         suffixes=["Aromatherapy Candle", "Home Fragrance", "Gift Candle"],
         brands=["Wickwell", "Glow & Co", "Emberly", "Hearth Light", "Soywick", "Lumina Home"],
         attributes=["soy wax", "long lasting", "lead free", "natural essential oils", "cotton wick"],
         options={"scent": ["vanilla", "lavender", "eucalyptus", "sandalwood", "fresh linen"],
                  "size": ["8 oz", "14 oz"]},
         price=(10, 39)),
]

OPTION_PHRASE = {"size": "in size {}", "color": "in {} color", "scent": "with {} scent",
                 "flavor": "in {} flavor", "style": "in {} style"}
BULLET_TEXT = {  # the sentence a feature bullet adds after its attribute
    0: "made for everyday use and tested for quality.",
    1: "a thoughtful choice you can rely on every day.",
    2: "designed with care by our product team.",
}
REVIEWS = [
    ("Love it", 5, "Exactly what I was looking for, would buy again."),
    ("Great value", 5, "Works as described and arrived quickly."),
    ("Pretty good", 4, "Does the job well, only minor complaints."),
    ("Okay", 3, "It is fine for the price, nothing special."),
    ("Not for me", 2, "Did not meet my expectations, returned it."),
]


def capwords(text):
    return " ".join(w[:1].upper() + w[1:] for w in text.split())


def make_asin(rng, used):
    while True:
        asin = "B0" + "".join(rng.choice("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(8))
        if asin not in used:
            used.add(asin)
            return asin


def make_product(t, j, rng, used):
    brand = t["brands"][j % len(t["brands"])]
    attrs = rng.sample(t["attributes"], 3)
    options = {}
    for name, values in t["options"].items():
        k = rng.randint(2, len(values))
        keep = set(rng.sample(values, k))
        options[name] = [v for v in values if v in keep]
    suffix = t["suffixes"][j % len(t["suffixes"])]
    title = f"{brand} {capwords(attrs[0])} {capwords(t['noun'])}, {suffix}"
    lo, hi = t["price"]
    price = round(rng.uniform(lo, hi), 2)
    description = (f"The {brand} {t['noun']} is {attrs[0]}, {attrs[1]} and {attrs[2]}. "
                   f"Part of the {t['query']} line from {brand}, made with care "
                   f"and backed by friendly customer support.")
    bullets = [f"{a.upper()}: {BULLET_TEXT[i]}" for i, a in enumerate(attrs)]
    bullets.append(f"WHAT YOU GET: one {t['noun']} from {brand} and a satisfaction guarantee.")
    reviews = [dict(title=r[0], score=r[1], body=r[2]) for r in rng.sample(REVIEWS, rng.randint(0, 3))]
    rating = round(sum(r["score"] for r in reviews) / len(reviews), 1) if reviews else "N.A."
    product = dict(asin=make_asin(rng, used), Title=title, category=t["category"],
                   product_category=t["path"], query=t["query"], noun=t["noun"], price=price,
                   Attributes=attrs, options=options, Description=description,
                   BulletPoints=bullets, Reviews=reviews, Rating=rating)
    check_no_option_leak(product)
    return product


def check_no_option_leak(p):
    """WebShop credits an option whose value appears in the title/features/description: keep
    option values out of those texts so the option reward depends on the clicked option only."""
    text = " ".join([p["Title"], " ".join(p["BulletPoints"]), p["Description"]]).lower()
    for values in p["options"].values():
        for v in values:
            assert f" {v} " not in f" {text} ", (p["Title"], v)


def price_upper(price, rng):
    """WebShop goal.py: sorted(random.sample(next four multiples of 10 above price, 2))[1]."""
    price_range = [p for p in PRICE_RANGE if p > price][:4]
    return sorted(rng.sample(price_range, 2))[1]


def make_goal(p, rng):
    goal_attrs = rng.sample(p["Attributes"], rng.randint(1, 2))
    goal_options = {name: rng.choice(values) for name, values in p["options"].items()}
    upper = price_upper(p["price"], rng)
    article = "an" if goal_attrs[0][0] in "aeiou" else "a"
    body = f"{article} {' and '.join(goal_attrs)} {p['noun']}"
    phrases = [OPTION_PHRASE[n].format(v) for n, v in goal_options.items()]
    if phrases:
        body += " " + " and ".join(phrases)
    opener = rng.choice(["i need", "i am looking for", "i want", "i would like", "find me"])
    return dict(asin=p["asin"], category=p["category"], query=p["query"], name=p["Title"],
                product_category=p["product_category"],
                instruction_text=f"{opener} {body}, and price lower than {upper:.2f} dollars",
                attributes=goal_attrs, goal_options=goal_options, price_upper=upper)


def make_webshop(rng):
    used, products = set(), []
    for t in TYPES:
        products += [make_product(t, j, rng, used) for j in range(PRODUCTS_PER_TYPE)]
    order = list(range(len(products)))
    rng.shuffle(order)
    goals = [make_goal(products[i], rng) for i in sorted(order[:N_GOALS])]
    rng.shuffle(goals)
    return products, goals


# ----------------------------------------------------------------------------------------------
# Web Browsing steps. A site: domain, website, header/footer context, distractor elements, and
# task templates. An element is (role, tag, attrs, text); an action is (element, op, value).
def el(role, tag, attrs, text=""):
    return dict(role=role, tag=tag, attrs=attrs, text=text)


def select_el(attrs, values):
    return dict(role="combobox", tag="select", attrs=attrs, text="", values=values)


SITES = [
    dict(website="skyways", domain="Travel / Airlines",
         distractors=[el("link", "a", "manage trips", "Manage trips"),
                      el("button", "button", "button sign in", "Sign in"),
                      el("link", "a", "mileage plus deals", "Explore MileagePlus deals"),
                      el("tab", "li", "tab heading level 3 hotels", "Hotels"),
                      el("link", "a", "baggage policy", "Baggage fees and policies")],
         tasks=[dict(text="Find one-way flights from {a} to {b} on {d}",
                     slots=dict(a=["Denver", "Chicago", "Seattle", "Atlanta", "Boston"],
                                b=["Miami", "Phoenix", "Newark", "Dallas", "Portland"],
                                d=["April 12", "May 3", "June 21"]),
                     actions=[(el("radio", "input", "radio one-way trip", "One-way"), "CLICK", ""),
                              (el("combobox", "input", "text from enter your departing city", "From"), "TYPE", "{a}"),
                              (el("option", "li", "option {a} airport", "{a} (all airports)"), "CLICK", ""),
                              (el("combobox", "input", "text to enter your destination city", "To"), "TYPE", "{b}"),
                              (el("button", "button", "button depart date {d}", "{d}"), "CLICK", ""),
                              (el("button", "button", "submit find flights", "Find flights"), "CLICK", "")]),
                dict(text="Check the status of flight {n} departing today",
                     slots=dict(n=["UA 512", "UA 1088", "UA 230", "UA 77"]),
                     actions=[(el("link", "a", "flight status", "Flight status"), "CLICK", ""),
                              (el("textbox", "input", "text flight number", "Flight number"), "TYPE", "{n}"),
                              (el("button", "button", "submit check status", "Check status"), "CLICK", "")])]),
    dict(website="tablebook", domain="Restaurants",
         distractors=[el("link", "a", "gift cards", "Gift cards"),
                      el("link", "a", "restaurant owners join", "For restaurant owners"),
                      el("div", "div", "promo", "Celebrating local chefs this spring"),
                      el("button", "button", "button log in", "Log in"),
                      el("link", "a", "blog", "Read our blog")],
         tasks=[dict(text="Book a {p} table for {g} at an {c} restaurant in {city}",
                     slots=dict(p=["dinner", "lunch", "brunch"], g=["2 guests", "4 guests", "6 guests"],
                                c=["Italian", "Indian", "Ethiopian"], city=["Austin", "Denver", "Boston"]),
                     actions=[(el("searchbox", "input", "search location", "Location"), "TYPE", "{city}"),
                              (select_el("type reservation", ["Dine in", "Pickup", "Delivery"]), "SELECT", "Dine in"),
                              (select_el("party size", ["1 guest", "2 guests", "4 guests", "6 guests"]), "SELECT", "{g}"),
                              (el("textbox", "input", "text cuisine or restaurant name", "Cuisine"), "TYPE", "{c}"),
                              (el("button", "button", "submit let's go", "Let's go"), "CLICK", "")]),
                dict(text="Order {dish} for pickup from the nearest {c} place",
                     slots=dict(dish=["pad thai", "margherita pizza", "chicken tikka"],
                                c=["Thai", "Italian", "Indian"]),
                     actions=[(select_el("type reservation", ["Dine in", "Pickup", "Delivery"]), "SELECT", "Pickup"),
                              (el("textbox", "input", "text cuisine or restaurant name", "Cuisine"), "TYPE", "{c}"),
                              (el("link", "a", "nearest result", "Nearest {c} kitchen"), "CLICK", ""),
                              (el("textbox", "input", "text search menu", "Search menu"), "TYPE", "{dish}")])]),
    dict(website="drivenow", domain="Car rental",
         distractors=[el("div", "div", "car sales", "Buy A Car"),
                      el("div", "div", "fleet management", "Enterprise Fleet Management"),
                      el("link", "a", "deals", "Deals and coupons"),
                      el("button", "button", "button rewards join", "Join rewards"),
                      el("link", "a", "truck rental", "Trucks and vans")],
         tasks=[dict(text="Find a {v} to rent in {city} from {d1} to {d2} for a {age} year old driver",
                     slots=dict(v=["mini van", "SUV", "compact car"], city=["Brooklyn", "Oakland", "Tampa"],
                                d1=["March 4", "April 5"], d2=["March 9", "April 8"], age=["22", "24"]),
                     actions=[(el("searchbox", "input", "pick-up & return location", "Pick-up location"), "TYPE", "{city}"),
                              (el("option", "li", "option {city} select", "{city}, US Select"), "CLICK", ""),
                              (el("button", "button", "pick-up date {d1}", "{d1}"), "CLICK", ""),
                              (el("button", "button", "return date {d2}", "{d2}"), "CLICK", ""),
                              (select_el("renter age", ["21", "22", "23", "24", "25+"]), "SELECT", "{age}"),
                              (el("button", "button", "submit browse vehicles", "Browse vehicles"), "CLICK", "")])]),
    dict(website="shopmart", domain="Shopping",
         distractors=[el("link", "a", "today's deals", "Today's deals"),
                      el("link", "a", "customer service", "Customer service"),
                      el("button", "button", "button account and lists", "Account & Lists"),
                      el("link", "a", "registry", "Registry"),
                      el("div", "div", "banner free shipping", "Free shipping on orders over $35")],
         tasks=[dict(text="Add a {item} in size {s} to the cart",
                     slots=dict(item=["men's rain jacket", "wool sweater", "denim jacket"], s=["M", "L", "XL"]),
                     actions=[(el("searchbox", "input", "search shopmart", "Search"), "TYPE", "{item}"),
                              (el("button", "button", "submit search", "Go"), "CLICK", ""),
                              (el("link", "a", "first result {item}", "{item} - best seller"), "CLICK", ""),
                              (select_el("size", ["S", "M", "L", "XL"]), "SELECT", "{s}"),
                              (el("button", "button", "add to cart", "Add to cart"), "CLICK", "")]),
                dict(text="Sort the {cat} category by lowest price",
                     slots=dict(cat=["headphones", "coffee makers", "desk lamps"]),
                     actions=[(el("link", "a", "department {cat}", "{cat}"), "CLICK", ""),
                              (select_el("sort by", ["Featured", "Price: Low to High", "Price: High to Low"]),
                               "SELECT", "Price: Low to High")])]),
    dict(website="citygov", domain="Government",
         distractors=[el("link", "a", "news releases", "News releases"),
                      el("link", "a", "contact the mayor", "Contact the mayor"),
                      el("button", "button", "button translate", "Translate"),
                      el("link", "a", "jobs", "City jobs"),
                      el("div", "div", "alert", "Offices closed on Monday for the holiday")],
         tasks=[dict(text="Renew the vehicle registration for plate {pl}",
                     slots=dict(pl=["7KXR201", "4TUV883", "9HBN552", "2MMC940"]),
                     actions=[(el("link", "a", "online services", "Online services"), "CLICK", ""),
                              (el("link", "a", "vehicle registration renewal", "Registration renewal"), "CLICK", ""),
                              (el("textbox", "input", "text license plate number", "License plate"), "TYPE", "{pl}"),
                              (el("button", "button", "submit continue", "Continue"), "CLICK", "")]),
                dict(text="Report a {issue} at {addr}",
                     slots=dict(issue=["pothole", "broken streetlight", "graffiti"],
                                addr=["12 Elm Street", "400 Main Street", "88 Oak Avenue"]),
                     actions=[(el("link", "a", "report a problem 311", "Report a problem"), "CLICK", ""),
                              (select_el("issue type", ["Pothole", "Broken streetlight", "Graffiti", "Other"]),
                               "SELECT", "{Issue}"),
                              (el("textbox", "input", "text street address", "Address"), "TYPE", "{addr}"),
                              (el("button", "button", "submit report", "Submit report"), "CLICK", "")])]),
    dict(website="showtix", domain="Entertainment",
         distractors=[el("link", "a", "gift cards", "Gift cards"),
                      el("link", "a", "sell tickets", "Sell tickets"),
                      el("button", "button", "button sign in", "Sign in"),
                      el("div", "div", "promo", "Presale access for members"),
                      el("link", "a", "help", "Help center")],
         tasks=[dict(text="Buy {q} tickets for {show} in {city}",
                     slots=dict(q=["2", "3", "4"], show=["Hamlet", "The Lion King", "Swan Lake"],
                                city=["Chicago", "Houston", "Seattle"]),
                     actions=[(el("searchbox", "input", "search artist event or venue", "Search events"), "TYPE", "{show}"),
                              (el("link", "a", "{show} {city}", "{show} - {city}"), "CLICK", ""),
                              (select_el("ticket quantity", ["1", "2", "3", "4", "5"]), "SELECT", "{q}"),
                              (el("button", "button", "find tickets", "Find tickets"), "CLICK", "")]),
                dict(text="Browse {genre} concerts happening this weekend",
                     slots=dict(genre=["jazz", "country", "hip hop", "classical"]),
                     actions=[(el("link", "a", "concerts", "Concerts"), "CLICK", ""),
                              (select_el("genre", ["All genres", "Jazz", "Country", "Hip hop", "Classical"]),
                               "SELECT", "{Genre}"),
                              (el("button", "button", "this weekend filter", "This weekend"), "CLICK", "")])]),
    dict(website="staybay", domain="Travel / Hotels",
         distractors=[el("link", "a", "list your property", "List your property"),
                      el("link", "a", "trips", "Trips"),
                      el("button", "button", "button currency usd", "USD"),
                      el("div", "div", "promo members save", "Members save 10% or more"),
                      el("link", "a", "support", "Support")],
         tasks=[dict(text="Find a hotel in {city} for {n} adults with free cancellation",
                     slots=dict(city=["Lisbon", "Kyoto", "Toronto", "Nashville"], n=["2", "3"]),
                     actions=[(el("searchbox", "input", "text where are you going", "Where to?"), "TYPE", "{city}"),
                              (select_el("adults", ["1", "2", "3", "4"]), "SELECT", "{n}"),
                              (el("button", "button", "submit search", "Search"), "CLICK", ""),
                              (el("checkbox", "input", "checkbox free cancellation", "Free cancellation"), "CLICK", "")])]),
    dict(website="sportzone", domain="Sports",
         distractors=[el("link", "a", "fantasy", "Fantasy"),
                      el("link", "a", "watch live", "Watch"),
                      el("button", "button", "button subscribe", "Subscribe"),
                      el("div", "div", "headline", "Trade deadline rumors heat up"),
                      el("link", "a", "podcasts", "Podcasts")],
         tasks=[dict(text="Show the {league} standings for the {season} season",
                     slots=dict(league=["NBA", "NHL", "MLS"], season=["2022", "2023"]),
                     actions=[(el("link", "a", "{league} menu", "{league}"), "CLICK", ""),
                              (el("link", "a", "standings", "Standings"), "CLICK", ""),
                              (select_el("season", ["2021", "2022", "2023"]), "SELECT", "{season}")]),
                dict(text="Find the roster of the {team}",
                     slots=dict(team=["Boston Celtics", "Denver Nuggets", "Miami Heat"]),
                     actions=[(el("searchbox", "input", "search teams players", "Search"), "TYPE", "{team}"),
                              (el("link", "a", "team {team}", "{team}"), "CLICK", ""),
                              (el("tab", "li", "tab roster", "Roster"), "CLICK", "")])]),
]
MAX_STEPS_PER_SITE = 22


def fill(text, slots):
    caps = {k.capitalize(): v.capitalize() for k, v in slots.items()}
    return text.format(**slots, **caps)


def render(e, i, slots):
    """Simplified-HTML repr of an element, as Mind2Web's get_tree_repr writes it."""
    idt = f" id={i}" if i is not None else ""
    attrs = fill(e["attrs"], slots).lower()
    if e["tag"] == "select":
        opts = " ".join(f"<option {fill(v, slots).lower()}> {fill(v, slots)} </option>" for v in e["values"])
        return f"<select{idt} {attrs}> {opts} </select>"
    if e["tag"] == "input":
        return f"<input{idt} {attrs} />"
    return f"<{e['tag']}{idt} {attrs}> <span> {fill(e['text'], slots)} </span> </{e['tag']}>"


def action_repr(e, op, value, slots):
    label = fill(e["text"] or e["attrs"], slots)
    return f"[{e['role']}]  {label} -> {op}" + (f": {value}" if op != "CLICK" else "")


def make_step(site, task, slots, k, prev, none_of_above, rng):
    elem, op, value = task["actions"][k]
    others = [a[0] for i, a in enumerate(task["actions"]) if i > k]  # elements of later actions
    pool = others + site["distractors"]
    negatives = rng.sample(pool, min(len(pool), rng.randint(2, 4)))
    candidates = negatives + ([] if none_of_above else [elem])
    rng.shuffle(candidates)
    parts = [render(c, i, slots) for i, c in enumerate(candidates)]
    html = (f"<html> <div> <header banner> <a {site['website']} home page /> </header> <main main> "
            + " ".join(f"<div> {p} </div>" for p in parts) + " </main> </div> </html>")
    choices = [" ".join(p.split()[:10]) for p in parts]
    answer = "A" if none_of_above else chr(66 + candidates.index(elem))
    return dict(website=site["website"], domain=site["domain"], task=fill(task["text"], slots),
                html=html, previous_actions=list(prev), choices=choices, answer=answer,
                action=None if none_of_above else op,
                value="" if none_of_above or op == "CLICK" else fill(value, slots))


def make_mind2web(rng):
    steps = []
    for site in SITES:
        site_steps = []
        for task in site["tasks"]:
            combos = list(itertools.product(*task["slots"].values()))
            rng.shuffle(combos)
            for combo in combos[:3]:
                slots = dict(zip(task["slots"], combo))
                prev = []
                for k, (elem, op, value) in enumerate(task["actions"]):
                    site_steps.append(make_step(site, task, slots, k, prev[-5:], rng.random() < 0.17, rng))
                    prev.append(action_repr(elem, op, fill(value, slots), slots))
        rng.shuffle(site_steps)
        steps += site_steps[:MAX_STEPS_PER_SITE]
    return steps


def write_json(obj, name):
    path = os.path.join(DATA_DIR, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def main():
    products, goals = make_webshop(random.Random(SEED))
    steps = make_mind2web(random.Random(SEED))
    for obj, name in [(products, "webshop_products.json"), (goals, "webshop_goals.json"),
                      (steps, "mind2web_steps.json")]:
        print(f"wrote {len(obj)} records to {write_json(obj, name)}")


if __name__ == "__main__":
    main()
