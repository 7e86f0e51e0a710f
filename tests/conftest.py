"""Shared fixtures: small official-layout checkpoints built once per session, an isolated model cache.

pytest.ini runs the suite in two pytest-xdist workers, one test file per worker at a time (--dist loadfile: a file's
session and module fixtures are built once), the heaviest files first (HEAVY_FILES_FIRST). Each worker and every process a test starts use one thread unless
OMP_NUM_THREADS says otherwise: the test models are tiny, and two workers already fill two cores."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep the embedded-default model cache and HF's module cache inside the test session."""
    old = {k: os.environ.get(k) for k in ("GLM_TUNE_CACHE",)}
    os.environ["GLM_TUNE_CACHE"] = str(tmp_path_factory.mktemp("glm-tune-cache"))
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(revision, formats, **shape) -> folder; identical requests share one folder."""
    from glm_tune.checkpoint import write_checkpoint

    built = {}

    def make(revision="v1.1", formats=("sharded-bin",), **shape):
        key = (revision, tuple(formats), tuple(sorted(shape.items())))
        if key not in built:
            name = f"{revision}-{'-'.join(formats)}-{len(built)}"
            built[key] = write_checkpoint(tmp_path_factory.mktemp("ckpt") / name, revision, formats, **shape)
        return built[key]

    return make


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The files that take longest (CI, 2026-12-03: a training demo or several multi-process runs each), heaviest first.
# xdist hands whole files to the two workers in collection order (--no-loadscope-reorder), each worker taking the next
# file when it is free; starting with these keeps one worker from being left alone with a long file at the end.
HEAVY_FILES_FIRST = ("test_finetune.py", "test_multi_gpu.py", "test_app_agent.py", "test_ptuning.py",
                     "test_app_lora_sd.py", "test_webui.py", "test_dpo.py", "test_api.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file, and for the rest


SHM = Path("/dev/shm")
SHM_BUFFERS = "deepspeed_allreduce_buffer_*"


def _is_xdist_worker(session):
    return hasattr(session.config, "workerinput")


def pytest_sessionstart(session):
    if not _is_xdist_worker(session):
        session.config._shm_before = set(SHM.glob(SHM_BUFFERS)) if SHM.is_dir() else set()


def pytest_sessionfinish(session):
    """DeepSpeed's CPU all-reduce leaves a 69 MB shared-memory buffer per rank in /dev/shm (RAM) for every launch and
    never unlinks it; remove the ones this test run made, once every worker is done (the main process)."""
    if not _is_xdist_worker(session) and SHM.is_dir():
        for path in set(SHM.glob(SHM_BUFFERS)) - getattr(session.config, "_shm_before", set()):
            path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory):
    """make_adapter(model_folder=None, seed=0) -> a saved LoRA adapter (every linear layer) whose LoRA B weights are
    random and non-zero, so that it changes the answers (a fresh adapter's B is zero and changes nothing)."""
    import torch

    from glm_tune.loading import load_model_and_tokenizer
    from glm_tune.lora import add_lora

    def make(model_folder=None, seed=0):
        model, _ = load_model_and_tokenizer(None if model_folder is None else str(model_folder), dtype="fp32")
        peft = add_lora(model, target="all")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5, generator=generator)
        folder = tmp_path_factory.mktemp("adapter") / "adapter"
        peft.save_pretrained(folder)
        return folder

    return make
