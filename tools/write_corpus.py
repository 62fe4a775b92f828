"""Write test_data/corpus.txt: simple English prose about a village, made from our own templates.

    python tools/write_corpus.py [--out test_data/corpus.txt] [--size 50000] [--seed 7]

Everything here (names, sentences, word lists) was written for this project; the
output is seeded, so a run with the same arguments writes the same file.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

VILLAGE = "Bramblecombe"
PEOPLE = [("Anna", "she", "her"), ("Tom", "he", "his"), ("Mary", "she", "her"), ("Ben", "he", "his"),
          ("Lucy", "she", "her"), ("Sam", "he", "his"), ("Rosa", "she", "her"), ("Jack", "he", "his"),
          ("Nell", "she", "her"), ("Peter", "he", "his")]
TRADES = {"Peter": "the baker", "Rosa": "the farmer", "Jack": "the miller", "Nell": "the teacher"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
TIMES = ["morning", "afternoon", "evening"]
WEATHER = {
    "sunny": ("The sun was warm and the sky was blue.", "children played in the field"),
    "rainy": ("Rain fell on the roofs all day long.", "everyone stayed near the fire"),
    "windy": ("The wind blew the leaves along the road.", "the washing danced on the line"),
    "cold": ("There was frost on the grass and the pond was hard.", "people wore thick coats"),
    "foggy": ("A grey fog lay over the fields and the river.", "the cows looked like shadows"),
    "snowy": ("Soft snow covered the hills and the gardens.", "the children made a snowman"),
    "warm": ("The air was soft and the bees were busy.", "the old men sat outside the inn"),
}
ANIMALS = {  # name: (plural, sound, what it does, what it eats)
    "dog": ("dogs", "barked", "ran after the ball", "meat"),
    "cat": ("cats", "purred", "slept by the stove", "fish"),
    "hen": ("hens", "clucked", "laid a brown egg", "corn"),
    "cow": ("cows", "mooed", "stood in the meadow", "grass"),
    "goat": ("goats", "bleated", "climbed on the wall", "leaves"),
    "sheep": ("sheep", "bleated", "walked up the hill", "grass"),
    "duck": ("ducks", "quacked", "swam on the pond", "bread"),
    "horse": ("horses", "neighed", "pulled the cart", "hay"),
    "pig": ("pigs", "grunted", "rolled in the mud", "apples"),
    "fox": ("foxes", "barked", "hid in the wood", "mice"),
    "owl": ("owls", "hooted", "sat in the oak tree", "mice"),
    "rabbit": ("rabbits", "thumped", "dug a hole in the bank", "carrots"),
}
GOODS = {  # singular: (plural, price in coins)
    "apple": ("apples", 1), "pear": ("pears", 1), "egg": ("eggs", 1), "loaf of bread": ("loaves of bread", 2),
    "cheese": ("cheeses", 3), "jar of honey": ("jars of honey", 4), "cabbage": ("cabbages", 2),
    "onion": ("onions", 1), "fish": ("fish", 3), "basket": ("baskets", 5), "candle": ("candles", 2),
    "pie": ("pies", 3),
}
TAME = [a for a in ANIMALS if a not in ("fox", "owl")]  # the ones people keep
PLACES = ["the market", "the mill", "the bakery", "the river", "the school", "the inn", "the church",
          "the farm", "the well", "the bridge", "the wood", "the meadow"]
FEELINGS = ["happy", "tired", "hungry", "glad", "sleepy", "cheerful", "cross", "quiet"]
COLOURS = ["red", "blue", "yellow", "white", "brown", "black"]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def num(n: int) -> str:
    return NUMBERS[n - 1] if 1 <= n <= len(NUMBERS) else str(n)


def who(r, name=None):
    p = next(p for p in PEOPLE if p[0] == name) if name else r.choice(PEOPLE)
    return p


def day_story(r):
    day = r.choice(DAYS)
    w = r.choice(list(WEATHER))
    name, he, his = who(r)
    place = r.choice(PLACES)
    animal = r.choice(TAME)
    feel = r.choice(FEELINGS)
    s = [f"On {day} {r.choice(TIMES)} it was {w} in {VILLAGE}.", WEATHER[w][0],
         f"{name} walked to {place} with {his} {animal}.",
         f"The {animal} {ANIMALS[animal][1]} and {ANIMALS[animal][2]}.",
         f"At {place} {he} met {who(r)[0]}, and they talked about the weather.",
         f"When {he} came home, {he} was {feel}."]
    if r.random() < 0.5:
        nxt = DAYS[(DAYS.index(day) + 1) % 7]
        s.append(f"The next day was {nxt}.")
    return " ".join(s)


def weather_para(r):
    w = r.choice(list(WEATHER))
    day = r.choice(DAYS)
    first, because = WEATHER[w]
    s = [f"{day} was a {w} day.", first, f"Because it was {w}, {because}."]
    w2 = r.choice([x for x in WEATHER if x != w])
    name, he, his = who(r)
    s.append(f"Old {name} looked at the sky and said that tomorrow would be {w2}.")
    s.append("And so it was." if r.random() < 0.6 else f"But {he} was wrong, and it was {w} again.")
    return " ".join(s)


def animal_para(r):
    owner = r.choice(PEOPLE)
    kinds = r.sample(TAME, 3)
    counts = [r.randint(2, 9) for _ in kinds]
    s = [f"{owner[0]} had {num(counts[0])} {ANIMALS[kinds[0]][0]}, {num(counts[1])} {ANIMALS[kinds[1]][0]} "
         f"and {num(counts[2])} {ANIMALS[kinds[2]][0]}."]
    for k in kinds:
        plural, sound, does, eats = ANIMALS[k]
        s.append(f"The {plural} ate {eats}. In the {r.choice(TIMES)} they {sound}.")
    k = r.choice(kinds)
    s.append(f"One day a {k} {ANIMALS[k][2]}, and {owner[0]} laughed.")
    s.append(f"That made {num(sum(counts))} animals in all.")
    return " ".join(s)


def market_dialogue(r):
    buyer = who(r)
    seller = r.choice(list(TRADES))
    item = r.choice(list(GOODS))
    plural, price = GOODS[item]
    n = r.randint(2, 4)
    total = n * price
    day = r.choice(DAYS)
    s = [f"On {day} {buyer[0]} went to the market.",
         f"\"Good {r.choice(TIMES)},\" said {seller} {TRADES[seller]}. \"What would you like today?\"",
         f"\"I would like {num(n)} {plural}, please,\" said {buyer[0]}.",
         f"\"One {item} costs {num(price)} coin{'s' if price > 1 else ''}, so {num(n)} {plural} cost {num(total)} coins,\" "
         f"said {seller}.",
         f"{buyer[0]} paid {num(total)} coins and said, \"Thank you.\"",
         f"\"Come again next {day},\" said {seller}."]
    return " ".join(s)


def week_para(r):
    start = r.randrange(7)
    s = ["There are seven days in a week."]
    for i in range(r.randint(3, 6)):
        a, b = DAYS[(start + i) % 7], DAYS[(start + i + 1) % 7]
        s.append(f"After {a} comes {b}.")
    name = who(r)[0]
    d = DAYS[r.randrange(7)]
    act = r.choice(["bakes bread", "goes to the market", "washes the clothes", "visits the mill",
                    "walks in the wood", "feeds the ducks", "sweeps the floor", "reads a book"])
    s.append(f"Every {d}, {name} {act}.")
    return " ".join(s)


def counting_para(r):
    k = r.choice(list(ANIMALS))
    plural = ANIMALS[k][0]
    n = r.randint(3, 8)
    name, he, his = who(r)
    s = [f"{name} counted the {plural} in the field."]
    s.append(", ".join(cap(num(i + 1)) if i == 0 else num(i + 1) for i in range(n)) + ".")
    s.append(f"There were {num(n)} {plural}.")
    m = r.randint(1, min(4, 12 - n))
    s.append(f"Then {num(m)} more {plural if m > 1 else k} came, and now there were {num(n + m)}.")
    if r.random() < 0.5:
        g = r.randint(1, n - 1)
        s.append(f"Later {num(g)} went away, and {num(n + m - g)} were left.")
    return " ".join(s)


def dialogue_para(r):
    a, b = r.sample(PEOPLE, 2)
    w = r.choice(list(WEATHER))
    place = r.choice(PLACES)
    lines = [
        f"\"Where are you going, {b[0]}?\" asked {a[0]}.",
        f"\"I am going to {place},\" said {b[0]}.",
        f"\"Why?\" asked {a[0]}.",
        f"\"Because I need {r.choice([GOODS[g][0] for g in GOODS])} for my mother.\"",
        "\"May I come with you?\"",
        f"\"Yes, you may. But bring a coat, it is {w}.\"",
    ]
    if r.random() < 0.5:
        lines.append(f"So the two friends walked to {place} together.")
    return " ".join(lines)


def evening_para(r):
    name, he, his = who(r)
    c = r.choice(COLOURS)
    k = r.choice(list(ANIMALS))
    s = [f"In the evening {name} sat by the window.",
         f"{cap(he)} could see the {c} door of {r.choice(PLACES)} and the path to the hill.",
         f"A {k} {ANIMALS[k][2]}.",
         f"{cap(he)} ate {r.choice(['soup', 'bread and cheese', 'an apple pie', 'porridge', 'a boiled egg'])} "
         f"and drank a cup of {r.choice(['milk', 'tea', 'warm water'])}.",
         f"Then {he} went to bed, because tomorrow was {r.choice(DAYS)}."]
    return " ".join(s)


def school_para(r):
    n1, n2 = r.randint(1, 6), r.randint(1, 6)
    child = who(r)
    s = [f"At the school, Nell the teacher asked, \"What is {num(n1)} and {num(n2)}?\"",
         f"{child[0]} put up {child[2]} hand and said, \"{cap(num(n1 + n2))}.\"",
         "\"Good,\" said Nell. \"And what day is it today?\"",
    ]
    d = r.choice(DAYS)
    s.append(f"\"Today is {d},\" said {child[0]}, \"and tomorrow is {DAYS[(DAYS.index(d) + 1) % 7]}.\"")
    s.append("The other children clapped.")
    return " ".join(s)


KINDS = [day_story, weather_para, animal_para, market_dialogue, week_para, counting_para, dialogue_para,
         evening_para, school_para]


def write_corpus(size: int, seed: int) -> str:
    r = random.Random(seed)
    paras, total = [], 0
    while total < size:
        p = r.choice(KINDS)(r)
        paras.append(p)
        total += len(p.encode("utf-8")) + 2
    return "\n\n".join(paras) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    p.add_argument("--out", default=str(root / "test_data" / "corpus.txt"))
    p.add_argument("--size", type=int, default=50000, help="approximate size in bytes")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    text = write_corpus(a.size, a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text, encoding="utf-8")
    print(f"{a.out}: {len(text.encode('utf-8'))} bytes, {text.count(chr(10) * 2) + 1} paragraphs")


if __name__ == "__main__":
    main()
