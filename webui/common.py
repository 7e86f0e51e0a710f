"""What both web pages share: the operator's command line, the model cache, the sidebar, streamed answers.

The operator decides on the command line which models, adapters and data folder the server may use; the sidebar only
chooses among those (no path typed in a browser is ever opened). The model is loaded once per server process and
shared by every session.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from glm_tune.arguments import add_compile_argument, add_model_arguments, add_sampling_arguments
from glm_tune.errors import UserError
from glm_tune.lora import SEED_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LORA_DIR = REPO_ROOT / "output"  # finetune.py's default --output_dir
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "feedback"
EMBEDDED = "embedded small model"
NO_ADAPTER = "none (base model)"
LOADS = []  # (model, adapter) of every load this process made: the tests check it stays at one per choice


class PageArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # a page shows it as one line instead of the server exiting
        raise UserError(f"{self.prog}: {message}")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the operator configured; nothing here comes from a browser."""

    models: tuple  # checkpoint folders (str); None is the embedded small model
    adapters: tuple  # adapter paths (str): every --lora_path, then those found under --lora_dir
    default_adapter: str | None
    data_dir: Path | None
    revision: str | None  # of every hub id among `models`
    dtype: str
    max_length: int
    temperature: float
    top_p: float
    ptuning_checkpoint: str | None = None  # a P-Tuning v2 prefix on every model (then no LoRA adapters are offered)
    compile_decoding: str = "off"  # glm_tune.static_decode's mode for every model


def parse_args(argv, page, with_data_dir=False):
    """`streamlit run webui/PAGE.py -- [flags]` -> ServerConfig; bad flags raise UserError."""
    parser = PageArgumentParser(prog=page, description="ChatGLM web page; flags go after `--`: "
                                            f"streamlit run webui/{page} -- --lora_path output")
    add_model_arguments(parser, repeatable=True, ptuning=True)
    parser.add_argument("--lora_dir", default=None,
                        help=f"folder whose adapters (up to two levels down) the sidebar offers (default: "
                             f"{DEFAULT_LORA_DIR.relative_to(REPO_ROOT)}/ when it exists)")
    if with_data_dir:
        parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR),
                            help="folder for dataset.jsonl, preferences.jsonl and generations.jsonl (default: "
                                 f"{DEFAULT_DATA_DIR.relative_to(REPO_ROOT)})")
    add_sampling_arguments(parser, max_length=True)
    add_compile_argument(parser)
    args = parser.parse_args(argv)
    if args.max_length < 1 or not 0 <= args.temperature <= 2 or not 0 < args.top_p <= 1:
        raise UserError(f"{page}: need --max_length >= 1, 0 <= --temperature <= 2 and 0 < --top_p <= 1")
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise UserError(f"--lora_dir {args.lora_dir}: no such folder")
    if args.ptuning_checkpoint and (args.lora_path or args.lora_dir):
        raise UserError("--lora_path / --lora_dir and --ptuning_checkpoint: give one of them (a model has a LoRA "
                        "adapter or a P-Tuning prefix)")
    lora_dir = Path(args.lora_dir) if args.lora_dir else DEFAULT_LORA_DIR
    adapters = [] if args.ptuning_checkpoint else list(dict.fromkeys([*args.lora_path,
                                                                      *map(str, find_adapters(lora_dir))]))
    return ServerConfig(
        models=tuple(args.model_name_or_path) or (None,),
        adapters=tuple(adapters),
        default_adapter=args.lora_path[0] if args.lora_path else None,
        data_dir=Path(args.data_dir) if with_data_dir else None,
        revision=args.revision,
        dtype=args.dtype,
        max_length=args.max_length,
        temperature=args.temperature,
        top_p=args.top_p,
        ptuning_checkpoint=args.ptuning_checkpoint,
        compile_decoding=args.compile_decoding,
    )


def find_adapters(folder):
    """Adapter folders in `folder` and up to two levels below it (e.g. output/ and output/checkpoint-400/)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = [folder, *folder.glob("*"), *folder.glob("*/*")]
    return sorted(path for path in candidates if path.is_dir() and _is_adapter(path))


def _is_adapter(folder):
    peft = (folder / "adapter_config.json").is_file() and any(folder.glob("adapter_model.*"))
    return peft or (folder / SEED_FILE).is_file()


def page_config(title, page, with_data_dir=False):
    """Set up the page and read the operator's flags; a bad flag shows one line and stops the page."""
    st.set_page_config(page_title=title, layout="wide")
    try:
        return parse_args(sys.argv[1:], page, with_data_dir)
    except UserError as err:
        st.error(f"error: {err}")
        st.stop()


@st.cache_resource(max_entries=1, show_spinner="Loading the model (once per server)…")
def load_model(model_name_or_path, lora_path, dtype, revision=None, ptuning_checkpoint=None,
               compile_decoding="off"):
    """(model, tokenizer), shared by every session of this server. One entry: switching models frees the last one.
    Every argument is part of the cache key (a P-Tuning checkpoint and the --compile_decoding mode included)."""
    from glm_tune.loading import load_model_and_tokenizer

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(model_name_or_path, lora_path, dtype, revision=revision,
                                                ptuning_checkpoint=ptuning_checkpoint, pack_for_cpu=True,
                                                compile_decoding=compile_decoding)
    LOADS.append((model_name_or_path, lora_path))
    print(f"webui: loaded {model_name_or_path or EMBEDDED} with "
          f"{'P-Tuning prefix ' + ptuning_checkpoint if ptuning_checkpoint else 'adapter ' + (lora_path or 'none')} in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    if model_name_or_path is None:  # streamlit replays this on every later call that the cache answers
        st.info("This is the embedded small demo model (random weights, for demos and tests): its answers mean "
                "nothing. For a real model start the server with `-- --model_name_or_path THUDM/chatglm-6b` (or a "
                "local chatglm-6b folder).", icon="ℹ️")
    return model, tokenizer


@dataclass(frozen=True)
class Settings:
    max_length: int
    temperature: float
    top_p: float

    def chat_kwargs(self):
        """Arguments for stream_chat; temperature 0 means greedy decoding."""
        if self.temperature == 0:
            return {"max_length": self.max_length, "do_sample": False}
        return {"max_length": self.max_length, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p}

    def as_dict(self):
        return {"max_length": self.max_length, "temperature": self.temperature, "top_p": self.top_p}


def sidebar_model(config):
    """The model and adapter chosen in the sidebar, among those the operator configured -> (model, adapter)."""
    adapters = (None, *config.adapters)
    # Options are indices into the configured lists: the browser can only send back one of them.
    model = st.sidebar.selectbox("Model", range(len(config.models)), key="model",
                                 format_func=lambda i: config.models[i] or EMBEDDED, disabled=len(config.models) == 1)
    adapter = st.sidebar.selectbox("LoRA adapter", range(len(adapters)), key="adapter",
                                   index=adapters.index(config.default_adapter),
                                   format_func=lambda i: adapters[i] or NO_ADAPTER)
    return config.models[model], adapters[adapter]


def sidebar_settings(config):
    st.sidebar.subheader("Generation")
    return Settings(
        max_length=st.sidebar.slider("Max length", 1, max(4096, config.max_length), config.max_length,
                                     key="max_length", help="prompt + answer tokens"),
        temperature=st.sidebar.slider("Temperature", 0.0, 2.0, config.temperature, step=0.05, key="temperature",
                                      help="0: greedy (the same answer every time)"),
        top_p=st.sidebar.slider("Top p", 0.01, 1.0, config.top_p, step=0.01, key="top_p"),
    )


def stream_answer(model_choice, query, history, settings, config, placeholder):
    """Load (or reuse) the chosen model, stream its answer to `query` into `placeholder`; -> (answer, seconds)."""
    model, tokenizer = load_model(*model_choice, config.dtype, config.revision, config.ptuning_checkpoint,
                                  config.compile_decoding)
    start = time.perf_counter()
    answer = ""
    for answer, _ in model.stream_chat(tokenizer, query, history, **settings.chat_kwargs()):
        placeholder.markdown(answer + " ▌")
    placeholder.markdown(answer)
    return answer, time.perf_counter() - start
