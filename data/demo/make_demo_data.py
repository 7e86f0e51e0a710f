"""Writes the embedded demo data set: word translation between Chinese and English, asked in twelve phrasings.

Every word and every phrasing occurs in train.jsonl; each (word, phrasing) pair occurs in only one of the two files,
so test.jsonl holds prompts the model never saw. The untuned small model answers them essentially never; a LoRA
fine-tune of a few minutes on 2 CPU cores gets them right. Run it again to regenerate the two files.
"""

import json
from pathlib import Path

WORDS = [
    ("apple", "苹果"), ("book", "书"), ("cat", "猫"), ("dog", "狗"), ("water", "水"), ("tree", "树"),
    ("sun", "太阳"), ("moon", "月亮"), ("flower", "花"), ("car", "汽车"), ("house", "房子"), ("river", "河"),
    ("mountain", "山"), ("bird", "鸟"), ("fish", "鱼"), ("rice", "米饭"), ("tea", "茶"), ("milk", "牛奶"),
    ("school", "学校"), ("teacher", "老师"), ("friend", "朋友"), ("city", "城市"), ("rain", "雨"), ("snow", "雪"),
    ("wind", "风"), ("star", "星星"), ("door", "门"), ("window", "窗户"), ("chair", "椅子"), ("table", "桌子"),
    ("computer", "电脑"), ("phone", "手机"), ("bread", "面包"), ("egg", "鸡蛋"), ("horse", "马"), ("cow", "牛"),
    ("sheep", "羊"), ("rabbit", "兔子"), ("tiger", "老虎"), ("panda", "熊猫"), ("music", "音乐"), ("morning", "早上"),
    ("night", "晚上"), ("road", "路"), ("bridge", "桥"), ("train", "火车"), ("boat", "船"), ("shoe", "鞋"),
    ("hat", "帽子"), ("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("white", "白色"), ("black", "黑色"),
    ("happy", "快乐"), ("big", "大"), ("small", "小"), ("hot", "热"), ("cold", "冷"), ("family", "家人"),
]
TO_CHINESE = [
    "Translate '{en}' into Chinese.",
    "What is the Chinese word for {en}?",
    'How do you say "{en}" in Chinese?',
    "Give the Chinese translation of: {en}",
    "In Chinese, what is {en}?",
    "Please write the word {en} in Chinese.",
]
TO_ENGLISH = [
    "把“{zh}”翻译成英文。",
    "“{zh}”的英文是什么？",
    "{zh}用英语怎么说？",
    "请将{zh}译为英语。",
    "用英文写出“{zh}”这个词。",
    "{zh}的英语单词是？",
]


def rows():
    templates = [(t, "zh") for t in TO_CHINESE] + [(t, "en") for t in TO_ENGLISH]
    for i, (en, zh) in enumerate(WORDS):
        for j, (template, answer_lang) in enumerate(templates):
            held_out = j == i % len(templates)  # one phrasing per word, a different one for each word in turn
            row = {"instruction": template.format(en=en, zh=zh), "input": "", "output": zh if answer_lang == "zh" else en}
            yield ("test" if held_out else "train"), row


def main():
    here = Path(__file__).parent
    split = {"train": [], "test": []}
    for name, row in rows():
        split[name].append(row)
    for name, items in split.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
        (here / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{name}: {len(items)} rows")


if __name__ == "__main__":
    main()
