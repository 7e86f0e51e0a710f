"""glm_tune.atomic.atomic_dir: `path` holds the whole old folder or the whole new one after a failure at any step of
the swap, never neither, and no temporary folder is left behind except the old one after the swap itself is done."""

import os
import shutil

import pytest

from glm_tune import atomic
from glm_tune.atomic import atomic_dir

OLD = {"a.txt": "old a", "sub/b.txt": "old b"}
NEW = {"a.txt": "new a", "c.txt": "new c"}


def write_tree(folder, files):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def read_tree(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def fail_on_call(monkeypatch, module, name, n):
    """Make module.name raise OSError (a simulated crash) on its n-th call; the others run as usual."""
    real, calls = getattr(module, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise OSError(f"simulated failure of {name} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    return calls


@pytest.fixture(params=["exchange", "two renames"])
def strategy(request, monkeypatch):
    if request.param == "two renames":  # where renameat2(RENAME_EXCHANGE) is missing: macOS, old kernels, some FSs
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    return request.param


def test_new_folder_replaces_old_and_nothing_is_left_beside(tmp_path, strategy):
    path = tmp_path / "saved"
    path.mkdir()
    write_tree(path, OLD)
    with atomic_dir(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        write_tree(tmp, NEW)
        assert read_tree(path) == OLD  # readers see the old folder until the block ends
    assert read_tree(path) == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_exchange_is_used_where_the_kernel_has_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_tree(a, {"x": "a"})
    write_tree(b, {"x": "b"})
    if not atomic._exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert (read_tree(a), read_tree(b)) == ({"x": "b"}, {"x": "a"})


def test_failing_block_keeps_the_old_folder(tmp_path, strategy):
    path = tmp_path / "saved"
    path.mkdir()
    write_tree(path, OLD)
    with pytest.raises(RuntimeError), atomic_dir(path) as tmp:
        write_tree(tmp, {"half": "written"})
        raise RuntimeError("killed mid-write")
    assert read_tree(path) == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


# (strategy, the call that fails) -> what `path` holds after, and whether atomic_dir raised. The swap by exchange
# calls no os.replace; by two renames it calls os.replace(path, aside), os.replace(new, path); both then delete the
# old folder with one shutil.rmtree.
SWAP_FAILURES = [
    ("exchange", "replace", 1, NEW, False),
    ("exchange", "rmtree", 1, NEW, True),  # the old folder could not be deleted: the new one is in place anyway
    ("two renames", "replace", 1, OLD, True),  # moving the old folder aside failed: it stays
    ("two renames", "replace", 2, OLD, True),  # moving the new folder in failed: the old one is put back
    ("two renames", "replace", 3, NEW, False),  # (no third call when all goes well)
    ("two renames", "rmtree", 1, NEW, True),
]


@pytest.mark.parametrize("strategy, name, n, expected, raised", SWAP_FAILURES, indirect=["strategy"])
def test_a_failure_at_any_step_of_the_swap_leaves_the_old_or_the_new_folder_whole(tmp_path, monkeypatch, strategy,
                                                                                  name, n, expected, raised):
    path = tmp_path / "saved"
    path.mkdir()
    write_tree(path, OLD)
    failed = None
    try:
        with atomic_dir(path) as tmp:
            write_tree(tmp, NEW)
            fail_on_call(monkeypatch, os if name == "replace" else shutil, name, n)  # only the swap can fail now
    except OSError as err:
        failed = err
    monkeypatch.undo()
    assert (failed is not None) == raised and (not raised or "simulated failure" in str(failed))
    assert read_tree(path) == expected
    leftovers = [p for p in tmp_path.iterdir() if p.name != "saved"]
    if expected is OLD or not raised:
        assert leftovers == []  # nothing of the new folder survives a failed swap; nothing is left after a good one
    else:  # the old folder that could not be deleted, whole, hidden beside
        assert len(leftovers) == 1 and leftovers[0].name.startswith(".saved.")
        assert OLD in [read_tree(leftovers[0])] + [read_tree(sub) for sub in leftovers[0].iterdir()]


def test_when_even_putting_the_old_folder_back_fails_it_is_kept_beside(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    path = tmp_path / "saved"
    path.mkdir()
    write_tree(path, OLD)
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) >= 2:  # the new folder cannot go in, nor the old one back
            raise OSError("simulated failure")
        return real(src, dst)

    with pytest.raises(OSError), atomic_dir(path) as tmp:
        write_tree(tmp, NEW)
        monkeypatch.setattr(os, "replace", replace)
    monkeypatch.undo()
    assert not path.exists()
    (aside,) = [p for p in tmp_path.iterdir()]
    assert aside.name.startswith(".saved.old-") and read_tree(aside / "saved") == OLD  # never deleted


def test_into_a_missing_path_and_failing_rename(tmp_path, monkeypatch):
    path = tmp_path / "deep" / "saved"
    fail_on_call(monkeypatch, os, "replace", 1)
    with pytest.raises(OSError), atomic_dir(path) as tmp:
        write_tree(tmp, NEW)
    monkeypatch.undo()
    assert not path.exists() and list(path.parent.iterdir()) == []
    with atomic_dir(path) as tmp:
        write_tree(tmp, NEW)
    assert read_tree(path) == NEW
