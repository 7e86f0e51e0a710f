"""Writes the embedded DPO demo set: preference pairs over the demo translation task (data/demo/).

Every row is {instruction, input, chosen, rejected}: the prompt asks for the translation of a word, `chosen` is the
right translation and `rejected` the answer that does not translate: the question's word repeated as it was asked
(Translate 'apple' into Chinese. -> chosen 苹果, rejected apple). The rule to learn, "answer in the language asked
for", holds for every row. The split is the demo data's: each (word, phrasing) prompt is in exactly one file, so
test.jsonl holds prompts the model never saw. Deterministic: run it again and the same two files come out.

    python data/dpo/make_preferences.py
"""

import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def demo_module():
    spec = importlib.util.spec_from_file_location("make_demo_data", HERE.parent / "demo" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows():
    demo = demo_module()
    translation = {en: zh for en, zh in demo.WORDS} | {zh: en for en, zh in demo.WORDS}
    for split, row in demo.rows():
        chosen = row["output"]
        rejected = translation[chosen]  # the word the question asked about, untranslated
        yield split, {"instruction": row["instruction"], "input": row["input"], "chosen": chosen,
                      "rejected": rejected}


def main():
    split = {"train": [], "test": []}
    for name, row in rows():
        split[name].append(row)
    for name, items in split.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
        (HERE / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{name}: {len(items)} pairs")


if __name__ == "__main__":
    main()
