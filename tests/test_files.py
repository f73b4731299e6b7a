import pytest

from cxr.files import atomic_path, read_json, write_json


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert read_json(target) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_folder(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "old").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_keras_suffix_is_kept(tmp_path):
    with atomic_path(tmp_path / "model.keras") as tmp:
        assert tmp.suffix == ".keras"
        tmp.write_text("m")
    assert (tmp_path / "model.keras").read_text() == "m"
