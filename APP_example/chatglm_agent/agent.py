"""Ask ChatGLM something it needs a tool for: it picks one tool per step (knowledge-base search, calculator,
copywriting, information extraction, web search), reads the result, and answers.

    python APP_example/chatglm_agent/agent.py                                   # one sample question per tool
    python APP_example/chatglm_agent/agent.py --question "3加5乘2等于多少" --json
    python APP_example/chatglm_agent/agent.py --question "婚假有几天？" --index_dir kb_index \
        --model_name_or_path THUDM/chatglm-6b --lora_path output

Without --model_name_or_path this runs the embedded small demo model with a router adapter that learned to pick
tools (trained with finetune.py on router_data/train.jsonl on first use, about 2-3 minutes on 2 CPU cores, then
cached): the tool choices are real, the model's own words (answers, copy) are noise. With a real ChatGLM-6B the
tool menu in the prompt is enough (--router_lora auto means none there). Web search is on when TAVILY_API_KEY is
set. --json prints exactly one JSON object on stdout: {"question", "answer", "steps": [{"tool", "input", "output",
"fallback", ...}], "stopped"}; progress goes to stderr.
"""

from glm_tune.agent import main as run_agent
from glm_tune.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    return run_agent(argv, description=__doc__)


if __name__ == "__main__":
    main()
