"""Write the router data set: requests in Chinese and English -> the tool that should answer them.

    python APP_example/chatglm_agent/make_router_data.py     # router_data/train.jsonl and heldout.jsonl

Deterministic (fixed seeds). Each request is a sentence frame filled with a keyword and a slot: "给{p}写一段{k}" with
k = 广告语 and p = 保温杯. Keywords (广告语, 天气, 抽取, ...) and slots (products, cities, expressions, ...) are shared
by both splits, but the frames are not: every held-out request is phrased in a way no training request is, so the
held-out accuracy measures whether the router learned what marks each tool, not the training sentences. A model
with random weights knows no words; it can only learn the ones it was shown, so the keywords are what both splits
must share. About one row in five has a result already (a second step) and should answer 完成 (done).

Rows are {"prompt", "completion"} for finetune.py, made by glm_tune.router.router_row from the agent's own router
prompt, plus the request, tool name and tool input (the request: the router names the tool, and the tool runs on
the request; a tool-input line is the agent's format too, but a small random model cannot learn to copy spans in
minutes).
"""

import argparse
import json
import random
from pathlib import Path

from glm_tune.agent_tools import ToolInputError, calculate
from glm_tune.router import HELDOUT_FILE, TRAIN_FILE, router_row

# -- slots -------------------------------------------------------------------------------------------------------------

SLOTS = {
    # kb_search: the sample knowledge base's topics (APP_example/chat_langchain/sample_kb) and company questions
    "t": {"zh": ["年假", "病假", "婚假", "产假", "调休", "请假流程", "报销流程", "差旅报销标准", "密码规定", "多因素认证",
                 "KeyGuard令牌丢失", "VaultBox密码管理器", "远程办公", "电热水壶KT-300", "水壶除垢", "墨石阅读器退货",
                 "阅读器无法开机", "成都三日游", "阳台种番茄", "麻婆豆腐做法", "LoRA微调", "天文社活动", "试用期",
                 "加班调休", "发票报销"],
          "en": ["annual leave", "sick leave", "the expense policy", "travel reimbursement", "the password policy",
                 "multi-factor authentication", "a lost KeyGuard token", "the KT-300 kettle", "descaling the kettle",
                 "the e-reader return policy", "the astronomy club", "growing tomatoes on a balcony",
                 "the mapo tofu recipe", "LoRA fine-tuning", "remote work", "parental leave"]},
    # copywriting: products
    "p": {"zh": ["便携咖啡机", "降噪耳机", "智能手环", "保温杯", "轻薄笔记本", "运动鞋", "有机绿茶", "电动牙刷", "新能源汽车",
                 "儿童绘本", "空气净化器", "机械键盘", "瑜伽垫", "扫地机器人", "手工巧克力", "露营帐篷", "智能台灯",
                 "蓝牙音箱"],
          "en": ["a portable coffee maker", "noise-cancelling headphones", "a smart watch", "a travel mug",
                 "running shoes", "organic green tea", "an electric toothbrush", "a camping tent", "a desk lamp",
                 "a mechanical keyboard", "a yoga mat", "a robot vacuum"]},
    # web_search: cities, news topics, things with a price
    "c": {"zh": ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "西安", "南京", "重庆", "天津", "苏州"],
          "en": ["Beijing", "Shanghai", "London", "Tokyo", "New York", "Paris", "Berlin", "Sydney"]},
    "n": {"zh": ["科技", "体育", "财经", "国际", "人工智能", "股市", "汽车", "娱乐"],
          "en": ["tech", "sports", "finance", "world", "AI", "stock market"]},
    "i": {"zh": ["黄金", "比特币", "原油", "猪肉", "美元汇率", "鸡蛋", "白银", "汽油"],
          "en": ["gold", "bitcoin", "oil", "silver", "the euro", "gasoline"]},
}
NAMES = {"zh": ["张伟", "李娜", "王芳", "刘洋", "陈静", "杨帆", "赵磊", "黄敏", "周杰", "吴倩"],
         "en": ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry"]}
ORGS = {"zh": ["清华大学", "星河科技", "华为", "人民医院", "北京大学", "墨石电子", "云朵电器"],
        "en": ["Google", "Nimbus Analytics", "MIT", "the city hospital", "Acme Corp", "Oxford University"]}
RELATIONS = {"zh": ["老师", "同事", "妻子", "哥哥", "导师", "朋友", "上司"],
             "en": ["teacher", "colleague", "sister", "manager", "friend", "mentor"]}
TITLES = {"zh": ["工程师", "教授", "经理", "医生", "设计师"], "en": ["engineer", "professor", "manager", "doctor", "designer"]}

# -- keywords: what marks each tool, shared by both splits -------------------------------------------------------------

KEYWORDS = {
    "calculator": {"zh": ["等于多少", "是多少", "等于几", "得多少", "的结果", "的值"],
                   "en": ["what is", "calculate", "compute", "how much is", "evaluate", "solve"]},
    "kb_search": {"zh": ["规定", "制度", "政策", "文档", "资料", "手册", "说明", "要求", "流程"],
                  "en": ["policy", "rules", "documents", "handbook", "manual", "guide", "docs"]},
    "copywriting": {"zh": ["文案", "广告语", "宣传语", "slogan", "推广文案", "营销文字", "标语", "广告词"],
                    "en": ["ad copy", "a slogan", "a tagline", "promo lines", "marketing copy", "an advert"]},
    "extract": {"zh": ["人物和关系", "实体", "实体关系", "人名和组织", "人物", "关系"],
                "en": ["entities and relations", "the people and organizations", "named entities",
                       "who is related to whom", "the relations", "the entities"]},
    # web_search keywords by slot kind
    "web_c": {"zh": ["天气", "气温", "会不会下雨", "空气质量"], "en": ["weather", "temperature", "rain", "forecast"]},
    "web_n": {"zh": ["新闻", "消息", "头条", "热点"], "en": ["news", "headlines", "updates", "stories"]},
    "web_i": {"zh": ["价格", "行情", "多少钱", "报价"], "en": ["price", "market price", "cost", "quote"]},
}
VERBS = {"calculator": {"zh": ["算一下", "计算", "算算", "帮我算", "求"], "en": []},
         "extract": {"zh": ["抽取", "提取", "找出", "识别", "列出"], "en": ["extract", "find", "list", "identify"]}}

# -- frames: TRAIN and HELDOUT never share one -------------------------------------------------------------------------
# {k} keyword, {v} verb, {e} expression, {x} a sentence about people, {t} {p} {c} {n} {i} slots (see SLOTS)

FRAMES = {
    "calculator": {
        "train": {"zh": ["{e}{k}", "{v}{e}", "{v}{e}{k}", "请{v}：{e}", "{e}{k}？"],
                  "en": ["{k} {e}?", "{k} {e}", "{e} = ?", "please {k} {e}"]},
        "heldout": {"zh": ["麻烦{v}{e}，谢谢", "问一下{e}{k}", "{e}，{k}呀"],
                    "en": ["could you {k} {e} for me", "quick: {k} {e}"]},
    },
    "kb_search": {
        "train": {"zh": ["公司的{t}{k}是什么？", "查一下{t}的{k}", "我想了解{t}的{k}", "{t}有什么{k}", "员工{k}里{t}怎么说"],
                  "en": ["what is the {k} on {t}?", "look up {t} in the {k}", "what do the {k} say about {t}?"]},
        "heldout": {"zh": ["请问关于{t}，{k}里怎么写的", "根据公司{k}，{t}是怎样的", "{t}——{k}是什么"],
                    "en": ["according to the {k}, what about {t}?", "find {t} in our {k}"]},
    },
    "copywriting": {
        "train": {"zh": ["给{p}写一段{k}", "为{p}写个{k}", "帮我写{p}的{k}", "{p}需要{k}"],
                  "en": ["write {k} for {p}", "I need {k} for {p}"]},
        "heldout": {"zh": ["想推广{p}，来几句{k}", "{p}上新了，帮忙写点{k}"],
                    "en": ["we launch {p}, draft {k}", "create {k} for {p} please"]},
    },
    "extract": {
        "train": {"zh": ["从下面这段话中{v}{k}：{x}", "{v}{k}：{x}", "请{v}这句话里的{k}：{x}"],
                  "en": ["{v} {k}: {x}", "{v} {k} in: {x}"]},
        "heldout": {"zh": ["{x}——{v}其中的{k}", "下面文本中有哪些{k}？{x}"],
                    "en": ["{x} -- {v} {k}", "please {v} {k} from this text: {x}"]},
    },
    "web_search": {
        "train": {"zh": ["今天{c}{kc}怎么样", "{c}明天{kc}如何", "最新的{n}{kn}", "搜索一下{n}{kn}", "今天{i}{ki}",
                         "{i}现在{ki}多少"],
                  "en": ["{c} {kc} today?", "latest {n} {kn}", "today's {i} {ki}", "search the web for {n} {kn}"]},
        "heldout": {"zh": ["{c}此刻的{kc}查一下", "帮我上网查查{n}方面的{kn}", "{i}今日{ki}是多少"],
                    "en": ["{kc} in {c} tomorrow?", "any breaking {n} {kn}?", "{ki} of {i} right now"]},
    },
}

# Frames every tool shares: they say nothing about the tool, so the router must learn it from the keyword and the
# slot ({s}: the tool's own slot) rather than from the sentence around them.
GENERIC_FRAMES = {
    "train": {"zh": ["{s}，{k}", "{k}：{s}", "{s}的{k}"], "en": ["{k}: {s}", "{s} - {k}"]},
    "heldout": {"zh": ["我想知道{s}的{k}", "{s}？{k}"], "en": ["{s}, {k}?", "tell me about {s} ({k})"]},
}
# Training requests get one of these in front or behind, half of the time: words that say nothing about the tool,
# so that the router learns to look past words it does not know (held-out requests are full of them).
FILLERS = {"zh": ["请问", "你好，", "麻烦", "谢谢", "？", "。", "一下", "帮我看看", "急", "老板问", "顺便", "同事想知道"],
           "en": ["hi,", "please", "thanks", "?", "now", "quick question:", "hey", "btw", "ok so", "my boss asks:"]}
SLOT_OF = {"calculator": "e", "kb_search": "t", "copywriting": "p", "extract": "x"}


def _expression(rng, chinese):
    """An arithmetic expression as people type it: symbols, or Chinese operator words."""
    numbers = [str(rng.randint(1, 99)) if rng.random() < 0.85 else f"{rng.randint(1, 20)}.{rng.randint(1, 9)}"
               for _ in range(rng.choice([2, 2, 3]))]
    if not chinese and len(numbers) == 3 and rng.random() < 0.4:
        a, b, c = numbers
        return f"({a}{rng.choice('+-')}{b}){rng.choice('*/')}{c}"
    ops = ["加", "减", "乘", "除以"] if chinese else ["+", "-", "*", "/"]
    expression = numbers[0]
    for number in numbers[1:]:
        expression += rng.choice(ops) + number
    return expression


def _sentence(rng, lang):
    a, b = rng.sample(NAMES[lang], 2)
    org, relation, title = rng.choice(ORGS[lang]), rng.choice(RELATIONS[lang]), rng.choice(TITLES[lang])
    if lang == "en":
        return rng.choice([f"{a} is the {relation} of {b}.", f"{a} works at {org} as a {title}.",
                           f"{a} and {b} founded {org}."])
    return rng.choice([f"{a}是{b}的{relation}。", f"{a}在{org}担任{title}。", f"{a}和{b}一起创办了{org}。"])


def fill(tool, lang, frame, rng):
    """(request, the slot it is about) for one frame in language `lang`."""
    values = {}
    if "{s}" in frame:  # a generic frame: this tool's slot (web search: one of its three kinds)
        slot = SLOT_OF.get(tool) or rng.choice("cni")
        keyword = "{k" + slot + "}" if tool == "web_search" else "{k}"
        frame = frame.replace("{s}", "{" + slot + "}").replace("{k}", keyword)
    if "{k}" in frame:
        values["k"] = rng.choice(KEYWORDS[tool][lang])
    if "{v}" in frame:
        values["v"] = rng.choice(VERBS[tool][lang])
    if "{e}" in frame:
        values["e"] = _expression(rng, chinese=lang == "zh" and rng.random() < 0.5)
    if "{x}" in frame:
        values["x"] = _sentence(rng, lang)
    for slot in SLOTS:
        if "{" + slot + "}" in frame:
            values[slot] = rng.choice(SLOTS[slot][lang])
            if tool == "web_search":
                values["k" + slot] = rng.choice(KEYWORDS["web_" + slot][lang])
    slot = next(values[s] for s in ("e", "x", *SLOTS) if s in values)
    return frame.format(**values), slot


# What a first step's result looks like, for the rows that should answer 完成: the tools' real output formats with
# varied content (the calculator's is computed), and the noise an untrained model writes as copy or extraction.
KB_SNIPPETS = ["hr/leave_policy.md#0 (score 0.03)\n# 星河科技有限公司员工请假制度（2024 年修订版）",
               "it_security_policy.txt#1 (score 0.02)\nPasswords. Every account password must be at least 14",
               "products/kettle_manual.html#2 (score 0.03)\n云朵智能电热水壶 KT-300 使用说明书",
               "travel/chengdu_guide.md#0 (score 0.02)\n# 成都三日游攻略 成都是四川省省会",
               "garden/balcony_tomatoes.txt#0 (score 0.03)\nGrowing tomatoes on a balcony",
               "support/faq.jsonl#3 (score 0.01)\n墨石电子阅读器的退货政策是什么？"]
WEB_RESULTS = ["web search is unavailable: set TAVILY_API_KEY", "web search failed: HTTP 500 Internal Server Error",
               "web search failed: timed out", "[1] {slot} - latest (https://news.example.com/1)\n{slot} today:",
               "answer: {slot} is 23 today\n[1] {slot} (https://example.com)"]
NOISE_WORDS = ["tape", "eque", "寻", "生活", "cont", "运动", "候", "da", "线", "感受", "点就", "dataclass", "辛", "况",
               "the", "所以我们", "计划", "下午"]


def _noise(rng):
    return "".join(rng.choice(NOISE_WORDS) + rng.choice(["", " "]) for _ in range(rng.randint(3, 30)))


def sample_result(tool, slot, request, rng):
    if tool == "calculator":
        try:
            return calculate(request)
        except ToolInputError as err:
            return f"error: {err}"
    if tool == "kb_search":
        return f"[1] {rng.choice(KB_SNIPPETS)}"
    if tool == "web_search":
        return rng.choice(WEB_RESULTS).format(slot=slot)
    if tool == "extract" and rng.random() < 0.5:
        return '{"entities": [], "relations": [], "raw": "' + _noise(rng) + '"}'
    if tool == "copywriting" and rng.random() < 0.3:
        return f'[{{"人群": "学生", "文案": "{slot}，陪你每一天"}}]'
    return _noise(rng)


def make_rows(split, per_tool, seed, done_share=1 / 5):
    """`per_tool` first-step rows for each tool from the split's frames (cycled, so each frame is used about as
    often), plus done rows (a result already there)."""
    rng = random.Random(f"{seed}-{split}")
    first_steps, seen = [], set()
    for tool, frames in FRAMES.items():
        both = [(lang, frame) for lang in ("zh", "en") for frame in frames[split][lang] + GENERIC_FRAMES[split][lang]]
        made = repeats = 0
        while made < per_tool:
            lang, frame = both[made % len(both)]
            request, slot = fill(tool, lang, frame, rng)
            if split == "train" and rng.random() < 0.5:
                filler, sep = rng.choice(FILLERS[lang]), " " if lang == "en" else ""
                request = f"{filler}{sep}{request}" if rng.random() < 0.5 else f"{request}{sep}{filler}"
            if request in seen and repeats < 50:  # a new request while the slots have one left
                repeats += 1
                continue
            seen.add(request)
            repeats = 0
            first_steps.append((router_row(request, tool), slot))
            made += 1
    rows = [row for row, _ in first_steps]
    for row, slot in rng.sample(first_steps, int(len(first_steps) * done_share)):
        step = {"tool": row["tool_name"], "input": row["request"],
                "output": sample_result(row["tool_name"], slot, row["request"], rng)}
        rows.append(router_row(row["request"], None, steps=[step]))
    rng.shuffle(rows)
    return rows


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_per_tool", type=int, default=180, help="(default: %(default)s)")
    parser.add_argument("--heldout_per_tool", type=int, default=20, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--train", default=str(TRAIN_FILE), help="(default: %(default)s)")
    parser.add_argument("--heldout", default=str(HELDOUT_FILE), help="(default: %(default)s)")
    args = parser.parse_args(argv)
    for path, split, per_tool in ((args.train, "train", args.train_per_tool),
                                  (args.heldout, "heldout", args.heldout_per_tool)):
        rows = make_rows(split, per_tool, args.seed)
        write_jsonl(path, rows)
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
