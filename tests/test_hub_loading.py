"""Hugging Face repo ids as --model_name_or_path, with no network: a small checkpoint laid out in a temporary Hugging
Face cache exactly as `snapshot_download` leaves it (blobs named by hash, refs/main holding the commit id,
snapshots/<commit>/ of relative symlinks), found by id at main, at a commit id and at the default revision; the same
answers as from the folder; every way it cannot be had is one line and exit 2. And the embedded demo model says so, once
per process, and on the web page."""

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

import glm_tune.loading as loading
from glm_tune.errors import UserError
from glm_tune.loading import HUB_FILES, load_model_and_tokenizer, resolve_model_path
from hub_cache import add_to_hub_cache

ROOT = Path(__file__).resolve().parent.parent
REPO = "THUDM/chatglm-6b"
MAIN = "a" * 8 + "0123456789abcdef0123456789abcdef"  # 40 hex digits, like a git commit id
OLDER = "b" * 8 + "0123456789abcdef0123456789abcdef"
SHAPE = dict(hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256, init_std=0.3)


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint("v1.1", ("sharded-bin",), **SHAPE)


@pytest.fixture(scope="module")
def hub_cache(checkpoint, make_checkpoint, tmp_path_factory):
    """<cache>/models--THUDM--chatglm-6b with main and an older commit, and a repo that is not a ChatGLM-6B."""
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    add_to_hub_cache(cache, REPO, checkpoint, MAIN, branch="main", patterns=HUB_FILES)
    add_to_hub_cache(cache, REPO, make_checkpoint("v1.1", ("safetensors",), **SHAPE), OLDER, branch=None,
                     patterns=HUB_FILES)
    other = tmp_path_factory.mktemp("chatglm2")
    (other / "config.json").write_text("{}")
    (other / "tokenizer_config.json").write_text("{}")  # no ice_text.model: another model family
    add_to_hub_cache(cache, "THUDM/chatglm2-6b", other, MAIN, branch="main", patterns=HUB_FILES)
    return cache


@pytest.fixture
def offline_hub(monkeypatch, hub_cache):
    """This process as if started with HF_HUB_CACHE=<hub_cache> HF_HUB_OFFLINE=1 (huggingface_hub reads them once)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def hub_env(hub_cache, via="HF_HUB_CACHE"):
    """This environment, offline, with the cache chosen the way users do: HF_HUB_CACHE, or HF_HOME (its hub/)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    cache = {"HF_HUB_CACHE": str(hub_cache), "HF_HOME": str(hub_cache.parent)}[via]
    return {**env, via: cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_script(*args, env=None):
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


# ----------------------------------------------------------------------------------------------------------------------
# Found in the cache


@pytest.mark.parametrize("revision", [None, "main", MAIN])
def test_repo_id_resolves_to_the_snapshot_of_main(offline_hub, revision):
    folder = resolve_model_path(REPO, revision)
    assert folder == offline_hub / "models--THUDM--chatglm-6b" / "snapshots" / MAIN
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "ice_text.model", "pytorch_model-00001-of-00003.bin", "pytorch_model-00002-of-00003.bin",
        "pytorch_model-00003-of-00003.bin", "pytorch_model.bin.index.json", "tokenizer_config.json"]
    assert all(p.is_symlink() and p.resolve().parent.name == "blobs" for p in folder.iterdir())


def test_an_older_commit_id_resolves_to_its_own_snapshot(offline_hub):
    folder = resolve_model_path(REPO, OLDER)
    assert folder.name == OLDER and (folder / "model.safetensors").is_symlink()


def test_a_local_folder_wins_over_a_repo_id_and_ignores_the_revision(offline_hub, checkpoint, tmp_path, monkeypatch):
    (tmp_path / "THUDM").mkdir()
    (tmp_path / "THUDM" / "chatglm-6b").symlink_to(checkpoint)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(REPO, "no-such-branch") == Path(REPO)


def test_model_and_tokenizer_from_a_repo_id_equal_those_from_the_folder(offline_hub, checkpoint):
    torch.set_num_threads(1)
    hub_model, hub_tokenizer = load_model_and_tokenizer(REPO, dtype="fp32", revision="main")
    model, tokenizer = load_model_and_tokenizer(checkpoint, dtype="fp32")
    assert hub_tokenizer.encode("你好，世界") == tokenizer.encode("你好，世界")
    ours = model.state_dict()
    assert all(torch.equal(tensor, ours[name]) for name, tensor in hub_model.state_dict().items())
    assert len(ours) == len(hub_model.state_dict())


def test_inference_script_answers_the_same_from_the_repo_id_as_from_the_folder(hub_cache, checkpoint):
    flags = ["--prompt", "hi", "--dtype", "fp32", "--max_new_tokens", "2"]
    from_hub = run_script("inference.py", "--model_name_or_path", REPO, *flags, env=hub_env(hub_cache, via="HF_HOME"))
    from_folder = run_script("inference.py", "--model_name_or_path", checkpoint, *flags)
    assert from_hub.returncode == 0, from_hub.stderr[-3000:]
    assert from_folder.returncode == 0, from_folder.stderr[-3000:]
    assert from_hub.stdout == from_folder.stdout and from_hub.stdout.startswith("'hi' -> ")
    assert "embedded" not in from_hub.stderr + from_folder.stderr  # a model was named: no demo-model notice


# ----------------------------------------------------------------------------------------------------------------------
# Not to be had: one line saying what to do


def test_missing_repo_and_missing_revision_exit_2_with_one_line(hub_cache):
    missing_repo = run_script("inference.py", "--model_name_or_path", "THUDM/no-such-model", "--prompt", "hi",
                              env=hub_env(hub_cache))
    # the scripts' --revision flag passes it to the same loader: call it the way they do
    load = ("import sys; from glm_tune.errors import exit_on_user_error; from glm_tune.loading import "
            "load_model_and_tokenizer; exit_on_user_error(load_model_and_tokenizer)(sys.argv[1], revision=sys.argv[2])")
    missing_revision = run_script("-c", load, REPO, "v9.9", env=hub_env(hub_cache))
    for result, expected in [(missing_repo, "--model_name_or_path THUDM/no-such-model (revision main): no such local "
                                            f"folder, and not in the Hugging Face cache {hub_cache}, which "
                                            "HF_HUB_OFFLINE=1 forbids downloading into"),
                             (missing_revision, f"--model_name_or_path {REPO} (revision v9.9): no such local folder, "
                                                f"and not in the Hugging Face cache {hub_cache}, which")]:
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {expected}"), result.stderr


@pytest.mark.parametrize("name, message", [
    ("/no/such/model", "/no/such/model: no such folder, and not a Hugging Face repo id (owner/name"),
    ("models/v1/chatglm-6b", "models/v1/chatglm-6b: no such folder, and not a Hugging Face repo id (owner/name"),
    ("THUDM/chatglm--6b", "THUDM/chatglm--6b: no such folder, and not a Hugging Face repo id (owner/name"),
    ("THUDM/chatglm2-6b", "--model_name_or_path THUDM/chatglm2-6b (revision main, "),
])
def test_not_a_folder_nor_a_chatglm_repo(offline_hub, name, message):
    with pytest.raises(UserError) as err:
        resolve_model_path(name)
    assert message in str(err.value) and "\n" not in str(err.value)
    if name == "THUDM/chatglm2-6b":
        assert str(err.value).endswith("not a ChatGLM folder (needs config.json and ice_text.model)")


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request the way the Hub answers for an unknown repo or revision (the error code header)."""

    def do_GET(self):
        code = "RevisionNotFound" if f"/api/models/{REPO}/revision/" in self.path else "RepoNotFound"
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", "not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("repo_id, revision, message", [
    ("THUDM/no-such-model", None, "--model_name_or_path THUDM/no-such-model (revision main): no such local folder, "
                                  "and no Hugging Face repo you can access by that id"),
    (REPO, "v9.9", f"--model_name_or_path {REPO} (revision v9.9): {REPO} has no revision v9.9"),
])
def test_online_answers_of_the_hub_become_one_line(fake_hub, repo_id, revision, message):
    with pytest.raises(UserError) as err:
        resolve_model_path(repo_id, revision)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@contextlib.contextmanager
def refused_port():
    """A local port that refuses connections (bound, never listening): the Hub without a network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_no_network_and_not_cached_is_one_line(monkeypatch, tmp_path):
    with refused_port() as port:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        with pytest.raises(UserError) as err:
            resolve_model_path(REPO)
    assert str(err.value).startswith(f"--model_name_or_path {REPO} (revision main): no such local folder, and not in "
                                     f"the Hugging Face cache {tmp_path}, and the Hugging Face Hub cannot be reached")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------------------
# The embedded demo model says so


def test_embedded_model_notice_is_printed_once_per_process(monkeypatch, capsys):
    monkeypatch.setattr(loading, "_embedded_notice_shown", False)
    assert resolve_model_path() == resolve_model_path(None)
    assert capsys.readouterr().err == loading.EMBEDDED_NOTICE + "\n"


def test_a_script_without_a_model_says_it_runs_the_embedded_one_once():
    # (with --model_name_or_path it says nothing: see test_inference_script_answers_the_same_from_the_repo_id_...)
    embedded = run_script("inference.py", "--prompt", "hi", "--dtype", "fp32", "--max_new_tokens", "2")
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    assert embedded.stderr.count("embedded small demo model") == 1
    assert loading.EMBEDDED_NOTICE in embedded.stderr.splitlines()
    assert "THUDM/chatglm-6b" in loading.EMBEDDED_NOTICE and "random weights" in loading.EMBEDDED_NOTICE


def test_web_page_shows_the_embedded_model_notice_and_only_for_it(monkeypatch, checkpoint):
    from streamlit.testing.v1 import AppTest

    torch.set_num_threads(1)
    shown = []
    for flags in ([], ["--model_name_or_path", str(checkpoint)]):
        monkeypatch.setattr(sys, "argv", ["web_ui.py", "--max_length", "20", "--temperature", "0", *flags])
        page = AppTest.from_file(ROOT / "webui" / "web_ui.py", default_timeout=300).run()
        page.chat_input(key="question").set_value("Hello").run()
        assert not page.exception and not page.error
        shown.append([info.value for info in page.info])
    assert len(shown[0]) == 1 and shown[0][0].startswith("This is the embedded small demo model (random weights")
    assert "THUDM/chatglm-6b" in shown[0][0] and shown[1] == []
