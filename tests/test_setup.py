"""The README's two commands are what CI runs: one set-up script for users and CI, which installs what the tests need
(the browser of the web UI's test included), and the README's test command."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_the_readme_opens_with_set_up_and_test_commands_that_ci_runs_too():
    setup, tests = readme_commands()
    assert "bash setup.sh" in setup and setup.endswith("python finetune.py")
    assert tests.endswith("python -m pytest -q tests")
    ci = (ROOT / ".ci/run").read_text()
    assert "bash setup.sh" in ci and "python -m pytest -q tests" in ci
    assert "export CI=true" in ci  # the browser test fails instead of skipping when no browser could be installed


def test_setup_installs_the_project_and_a_browser_and_is_valid_bash():
    script = (ROOT / "setup.sh").read_text()
    assert "torch==2.13.0" in script and "-r requirements.txt" in script and "install -q -e ." in script
    assert "apt-get install -y -qq chromium" in script and "playwright install chromium" in script
    assert subprocess.run(["bash", "-n", str(ROOT / "setup.sh")]).returncode == 0


def test_setup_installs_the_apps_libraries_without_replacing_torch():
    script = (ROOT / "setup.sh").read_text()
    assert '-r APP_example/requirements.txt -c "$TORCH_PIN"' in script  # the installed torch, pinned
    names = {re.split(r"[<>=\s#]", line.strip())[0].lower() for line in
             (ROOT / "APP_example/requirements.txt").read_text().splitlines() if line.strip()[:1].isalpha()}
    assert {"langchain-core", "faiss-cpu", "sentence-transformers", "rank-bm25", "jieba", "pypdf",
            "noto-cjk[sans]", "rapidocr", "onnxruntime", "espeakng-loader", "scipy",
            "opencv-python-headless", "imageio-ffmpeg"} <= names
    assert not names & {"torch", "open-clip-torch", "timm", "torchvision"}  # packages that pull a CUDA torch


def test_every_page_binds_127_0_0_1_unless_told_otherwise():
    """Streamlit reads <the page's folder>/.streamlit/config.toml (its script-level config) from any working
    directory; without one a page would listen on every interface. test_webui checks the real listener."""
    import tomllib

    pages = sorted(ROOT.glob("APP_example/*/app.py")) + [ROOT / "webui" / "web_ui.py"]
    assert len(pages) >= 5
    for page in pages:
        config = page.parent / ".streamlit" / "config.toml"
        assert config.is_file(), f"{config} missing"
        server = tomllib.loads(config.read_text())["server"]
        assert server["address"] == "127.0.0.1" and server["headless"] is True, config
