"""What the script and page tests of the apps share: a script loaded by its path, a script's one-line error, a run in
another working directory, a Streamlit page opened under AppTest as `streamlit run PAGE -- flags` starts it, and a
page that shows no error."""

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest


def load_script(path, prefix):
    """The script at `path` as a module named prefix_<stem> (several apps have a generate.py or an app.py); its own
    folder is importable while it loads, as when it runs."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"{prefix}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def one_line_error(capsys, call, *argv):
    """Run `call(argv)` (a script's main), which must exit with status 2 and one `error:` line on stderr, no
    traceback; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        call(list(map(str, argv)))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


def open_page(monkeypatch, page, *flags, timeout=120):
    """A new browser session on `page`, the server started as `streamlit run page -- flags`."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", [Path(page).name, *map(str, flags)])
    return AppTest.from_file(str(page), default_timeout=timeout).run()


def assert_clean(at):
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@contextlib.contextmanager
def working_directory(path):
    """Run the block in `path` (a script's default output folder is relative to where it runs)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield Path(path)
    finally:
        os.chdir(old)
