"""Write assets/prompts/distill.jsonl: the self-distillation prompts, generated from templates.

Every template and word list below was written for nbdiff (Apache-2.0). The output is
deterministic (seeded), so running this again rewrites the same file:

    python scripts/make_prompts.py --out assets/prompts/distill.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Maya", "Tomas", "Aiko", "Ravi", "Lena", "Omar", "Greta", "Jonah", "Priya", "Felix", "Nadia", "Hugo",
         "Ines", "Kofi", "Mila", "Sven", "Leila", "Bruno", "Zara", "Elio"]
ITEMS = [("apples", "basket"), ("stamps", "album"), ("marbles", "jar"), ("books", "shelf"), ("pencils", "box"),
         ("cookies", "tin"), ("shells", "bucket"), ("cards", "deck"), ("eggs", "carton"), ("coins", "purse"),
         ("seeds", "packet"), ("buttons", "drawer")]
TOPICS = ["the water cycle", "photosynthesis", "how vaccines work", "why the sky is blue", "how a bicycle stays upright",
          "what inflation is", "how bread rises", "why leaves change colour in autumn", "how a compass works",
          "what a black hole is", "how bees make honey", "why we have seasons", "how a refrigerator keeps food cold",
          "what gravity does", "how rainbows form", "why the moon has phases", "how muscles grow", "what DNA is",
          "how an airplane wing creates lift", "why metal feels colder than wood", "how sound travels",
          "what an ecosystem is", "how a battery stores energy", "why ice floats", "how the heart pumps blood",
          "what a volcano is", "how tides happen", "why we need sleep", "how a search engine finds pages",
          "what recycling does", "how clouds form", "what interest on a loan is", "how a lighthouse works",
          "why cats purr", "how glass is made", "what a food chain is", "how a thermometer works",
          "what an atom is", "how wind turbines make electricity", "why salt melts ice"]
AUDIENCES = ["a ten-year-old", "a busy adult", "a high-school student", "someone who has never heard of it",
             "a grandparent", "a curious teenager"]
LIST_THINGS = ["fruits that are high in vitamin C", "ways to save water at home", "board games for a family evening",
               "tips for a job interview", "healthy breakfast ideas", "hobbies you can start with little money",
               "things to pack for a weekend hike", "ways to reduce stress", "questions to ask a new doctor",
               "habits that improve focus", "indoor plants that are easy to keep", "ways to learn a new language",
               "things to check before a long car trip", "vegetables that grow well in pots", "rainy-day activities for kids",
               "ways to be kind to a neighbour", "simple exercises for the morning", "tips for writing a clear email",
               "uses for an old jar", "ways to make a small room feel bigger", "famous rivers of the world",
               "musical instruments for beginners", "animals that live in the desert", "ways to keep a notebook organised",
               "reasons to learn to cook", "snacks for a long flight", "things to do in a new city",
               "ways to fall asleep faster", "safety rules for a kitchen", "planets of the solar system"]
COUNTS = ["three", "four", "five", "six", "seven"]
CODE_TASKS = ["reverses a string", "checks whether a number is prime", "returns the largest item of a list",
              "counts the vowels in a word", "sums the even numbers in a list", "converts Celsius to Fahrenheit",
              "checks whether a word is a palindrome", "removes duplicates from a list while keeping order",
              "returns the factorial of n", "merges two sorted lists", "counts how often each word appears in a text",
              "returns the n-th Fibonacci number", "flattens a list of lists", "capitalises every word of a sentence",
              "finds the average of a list of numbers", "returns the second smallest number in a list",
              "checks whether two words are anagrams", "rounds a price to two decimals", "splits a list into chunks of size k",
              "returns the common items of two lists"]
LANGS = ["Python", "JavaScript", "Python", "Rust", "Go", "Python"]
SENTENCES = ["The meeting was moved to Thursday because the room was booked.",
             "Our cat sleeps on the warm windowsill every afternoon.",
             "I forgot my umbrella, so I got soaked on the way home.",
             "The library will close early during the holidays.",
             "She planted tomatoes, but the snails ate most of them.",
             "The train was late, and nobody told the passengers why.",
             "We painted the fence blue and it looks much brighter now.",
             "He practised the piano for an hour before dinner.",
             "The bakery on the corner sells the best bread in town.",
             "After the storm, the river rose above the old bridge.",
             "My brother fixed the bicycle with a borrowed wrench.",
             "The children built a fort out of blankets and chairs.",
             "The museum opens a new exhibition about ancient maps next week.",
             "I wrote a list of groceries and then left it on the table.",
             "The team celebrated after finishing the project on time.",
             "Fresh snow covered the garden when we woke up.",
             "The shop assistant helped me find a smaller size.",
             "Our neighbours are moving to a farm in the countryside.",
             "The kettle whistled while we were talking in the hall.",
             "A small boat drifted slowly across the quiet lake."]
REWRITES = ["Rewrite this sentence in a more formal tone", "Rewrite this sentence so a child can understand it",
            "Make this sentence shorter", "Rewrite this sentence in the past tense" , "Rewrite this sentence as a question",
            "Turn this sentence into a short headline", "Rewrite this sentence in a cheerful tone",
            "Rewrite this sentence in the passive voice"]
TRANSLATE = ["French", "Spanish", "German", "Italian", "Portuguese"]
WRITE = ["a short poem about {}", "a two-sentence story about {}", "a friendly note inviting a friend to {}",
         "a short product description for {}", "a haiku about {}", "a limerick about {}", "a short speech thanking {}"]
WRITE_OBJ = ["the first day of spring", "a lost umbrella", "a picnic in the park", "a new coffee mug", "the night sky",
             "a sleepy dog", "a volunteer group", "an old lighthouse", "a rainy Monday", "a school garden",
             "a birthday party", "a mountain trail", "a solar lamp", "a bus driver", "a quiet library"]
COMPARE = [("a cat", "a dog"), ("tea", "coffee"), ("a train", "a plane"), ("reading a book", "watching a film"),
           ("renting", "buying a home"), ("a laptop", "a tablet"), ("summer", "winter"), ("walking", "cycling"),
           ("a lake", "a sea"), ("a city", "a village"), ("email", "a phone call"), ("paper books", "e-books")]
QUESTIONS = ["What is the difference between weather and climate?", "Why do we brush our teeth?",
             "What does a librarian do?", "How do I boil an egg?", "What is a good way to start a diary?",
             "How can I remember names better?", "What should I do if I feel tired all day?",
             "How do I make a cup of tea?", "What is a verb?", "What is the capital of Japan?",
             "How many days are in a leap year?", "What is a noun?", "How do I plant a seed?",
             "Why is exercise good for you?", "What is a fraction?", "How do I write a thank-you card?",
             "What does a budget help with?", "How do birds know where to fly in winter?",
             "What is the largest ocean?", "How do I tie a simple knot?"]


def arithmetic(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    item, holder = rng.choice(ITEMS)
    a, b, c = rng.randint(3, 60), rng.randint(2, 30), rng.randint(2, 9)
    forms = [
        f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?",
        f"A {holder} holds {a} {item}. {name} takes out {min(b, a - 1)}. How many are left in the {holder}?",
        f"{name} buys {c} packs of {item} with {b} in each pack. How many {item} is that in total?",
        f"{name} shares {a * c} {item} equally among {c} friends. How many does each friend get?",
        f"{name} had {a} {item}, gave away {min(b, a - 1)} and then found {c} more. How many does {name} have?",
        f"Each {holder} holds {c} {item}. How many {holder}s does {name} need for {a * c} {item}?",
        f"{name} reads {c} pages a day. How many pages will {name} read in {b} days?",
        f"A ticket costs {c} dollars. {name} buys {b} tickets and pays with {b * c + a} dollars. How much change does {name} get?",
    ]
    suffix = rng.choice(["", " Explain your steps.", " Show the working.", " Answer with a short explanation."])
    return rng.choice(forms) + suffix


def generators():
    return [
        (3, arithmetic),
        (2, lambda r: f"Explain {r.choice(TOPICS)} to {r.choice(AUDIENCES)}."),
        (1, lambda r: f"In a few sentences, what is {r.choice(TOPICS)}?".replace("what is how", "explain how").replace("what is what", "what").replace("what is why", "explain why")),
        (2, lambda r: f"List {r.choice(COUNTS)} {r.choice(LIST_THINGS)}."),
        (1, lambda r: f"Give me {r.choice(COUNTS)} {r.choice(LIST_THINGS)}, one per line."),
        (2, lambda r: f"Write a {r.choice(LANGS)} function that {r.choice(CODE_TASKS)}."),
        (1, lambda r: f"Explain in plain words how to write code that {r.choice(CODE_TASKS)}."),
        (2, lambda r: f"{r.choice(REWRITES)}: \"{r.choice(SENTENCES)}\""),
        (1, lambda r: f"Translate into {r.choice(TRANSLATE)}: \"{r.choice(SENTENCES)}\""),
        (2, lambda r: "Write " + r.choice(WRITE).format(r.choice(WRITE_OBJ)) + "."),
        (1, lambda r: "Compare {} and {} in a short paragraph.".format(*r.choice(COMPARE))),
        (1, lambda r: "What are the pros and cons of {} compared with {}?".format(*r.choice(COMPARE))),
        (1, lambda r: r.choice(QUESTIONS)),
        (1, lambda r: f"Summarise this in one sentence: \"{r.choice(SENTENCES)} {r.choice(SENTENCES)}\""),
    ]


def make(count: int, seed: int, exclude: set[str] | None = None) -> list[str]:
    rng = random.Random(seed)
    gens = generators()
    weights = [w for w, _ in gens]
    seen: set[str] = set(exclude or ())
    out: list[str] = []
    tries = 0
    while len(out) < count and tries < count * 50:
        tries += 1
        _, make_one = rng.choices(gens, weights=weights)[0]
        text = make_one(rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/prompts/distill.jsonl")
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--exclude", help="a prompts .jsonl whose prompts must not be repeated")
    args = parser.parse_args()
    exclude = set()
    if args.exclude:
        with open(args.exclude, encoding="utf-8") as f:
            exclude = {json.loads(line)["prompt"] for line in f if line.strip()}
    prompts = make(args.count, args.seed, exclude)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}, ensure_ascii=False) + "\n")
    print(f"{len(prompts)} prompts -> {path}")


if __name__ == "__main__":
    main()
