"""An OpenAI-compatible API for ChatGLM-6B (and LoRA adapters), with batched decoding: concurrent requests share
forward passes. Without arguments it serves the embedded small demo model on http://127.0.0.1:8000.

    python api.py --model_name_or_path THUDM/chatglm-6b --lora_path output --lora_path belle=runs/belle

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "chatglm-6b", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 64}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")   # --api_key: pass the same key
    reply = client.chat.completions.create(model="chatglm-6b", messages=[{"role": "user", "content": "你好"}])
    print(reply.choices[0].message.content)

Routes: POST /v1/chat/completions, POST /v1/completions (both with "stream": true for server-sent events), GET
/v1/models (the base model and each --lora_path adapter by name), the official POST / ({prompt, history}), GET
/health (503 while loading or shutting down). SIGTERM: requests in flight finish, new ones get 503, then exit 0.
"""

import argparse
import os
import signal
import threading
import time
from pathlib import Path

import uvicorn

from glm_tune.api_server import Service, create_app, load_in_background
from glm_tune.arguments import LORA_HELP, add_model_arguments, add_sampling_arguments
from glm_tune.errors import UserError, exit_on_user_error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, lora=False, ptuning=True)
    parser.add_argument("--lora_path", action="append", default=[], metavar="[NAME=]PATH",
                        help=LORA_HELP + "; repeatable: each adapter is served by name, NAME=PATH names it (default "
                                         "name: the folder's)")
    add_sampling_arguments(parser, max_length=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--api_key", default=os.environ.get("GLM_TUNE_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $GLM_TUNE_API_KEY, else no key)")
    parser.add_argument("--max_batch_size", type=int, default=16, help="most rows decoded together")
    parser.add_argument("--max_queue", type=int, default=64, help="most requests waiting; more get 429")
    parser.add_argument("--request_timeout", type=float, default=600.0,
                        help="seconds a request may wait and run in all (default: %(default)s)")
    parser.add_argument("--request_log", default=None, help="append one JSON line per request to this file")
    parser.add_argument("--served_model_name", default=None,
                        help="the base model's name in /v1/models (default: from --model_name_or_path)")
    args = parser.parse_args(argv)
    if args.max_batch_size < 1 or args.max_queue < 1:
        raise UserError("--max_batch_size and --max_queue must be at least 1")
    return args


def adapter_names(lora_paths):
    """{name: path} for `--lora_path [NAME=]PATH` flags."""
    named = {}
    for spec in lora_paths:
        name, path = spec.split("=", 1) if "=" in spec and not Path(spec).exists() else (None, spec)
        name = name or (Path(path).parent.name if Path(path).is_file() else Path(path).name)
        if name in named:
            raise UserError(f"--lora_path {spec}: the name {name!r} is taken; name it: --lora_path NAME=PATH")
        named[name] = path
    return named


def load_engine(args, adapters):
    import torch

    from glm_tune.loading import load_model_and_tokenizer
    from glm_tune.runtime import pack_linears_for_cpu_inference
    from glm_tune.serving import BatchEngine

    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, None, dtype=args.dtype,
                                                revision=args.revision, ptuning_checkpoint=args.ptuning_checkpoint)
    if torch.cuda.is_available():
        model = model.cuda()
    internal = {}  # served name -> PEFT adapter name
    for name, path in adapters.items():
        peft_folder = (Path(path) / "adapter_config.json").exists()
        if not internal:
            if peft_folder:
                from peft import PeftModel

                model, internal[name] = PeftModel.from_pretrained(model, path, adapter_name=name), name
            else:  # the seed's chatglm-lora.pt
                from glm_tune.lora import apply_adapter

                model, internal[name] = apply_adapter(model, path), "default"
        elif peft_folder:
            model.load_adapter(path, adapter_name=name)
            internal[name] = name
        else:
            raise UserError(f"--lora_path {path}: only the first adapter may be a chatglm-lora.pt; give the others "
                            "as PEFT adapter folders")
    pack_linears_for_cpu_inference(model)  # after the adapters: their layers stay as PEFT made them
    model.eval()
    engine = BatchEngine(model, tokenizer, args.max_batch_size, args.max_queue, adapters=internal)
    return engine.start(), tokenizer


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM draining first: new requests get 503, those in flight finish, then the server exits."""

    def __init__(self, config, service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame):
        if sig != signal.SIGTERM or self.service.draining:
            return super().handle_exit(sig, frame)
        self.service.draining = True
        if self.service.engine is not None:
            self.service.engine.stop_accepting()

        def drain():
            # until every response begun is sent (the engine may be done with a row while its stream is still being
            # written), or the longest a request may take
            deadline = time.monotonic() + self.service.request_timeout
            while time.monotonic() < deadline and (self.service.in_flight > 0 or (
                    self.service.engine is not None and self.service.engine.busy())):
                time.sleep(0.05)
            self.should_exit = True  # not handle_exit: uvicorn would re-raise SIGTERM at the end (exit -15, not 0)

        threading.Thread(target=drain, name="drain", daemon=True).start()


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    adapters = adapter_names(args.lora_path)
    if adapters and args.ptuning_checkpoint:
        raise UserError("--lora_path and --ptuning_checkpoint: give one of them (a model has LoRA adapters or a "
                        "P-Tuning prefix)")
    for name, path in adapters.items():
        if not Path(path).exists():
            raise UserError(f"--lora_path {path}: no such file or folder")
    base_name = args.served_model_name or (Path(args.model_name_or_path).name if args.model_name_or_path and
                                           Path(args.model_name_or_path).is_dir() else args.model_name_or_path)
    service = Service(base_name or "chatglm-small", list(adapters), args.max_length, args.temperature, args.top_p,
                      args.request_timeout, args.request_log, args.api_key)
    load_in_background(service, lambda: load_engine(args, adapters))
    config = uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=30)
    DrainingServer(config, service).run()


if __name__ == "__main__":
    main()
