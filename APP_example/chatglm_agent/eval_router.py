"""Train (or reuse) the agent's router adapter and print its held-out scores: tool accuracy (the share of held-out
requests whose tool it picks), and its "done" accuracy on requests that have a result already.

    python APP_example/chatglm_agent/eval_router.py                    # the embedded model's router (cached)
    python APP_example/chatglm_agent/eval_router.py --router_lora none --model_name_or_path THUDM/chatglm-6b

The held-out requests (router_data/heldout.jsonl) are phrased with templates the training rows never use.
"""

from glm_tune.errors import exit_on_user_error
from glm_tune.router import eval_main


@exit_on_user_error
def main(argv=None):
    return eval_main(argv, description=__doc__)


if __name__ == "__main__":
    main()
