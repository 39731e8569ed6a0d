import os
import stat

from sparsify.atomic import atomic_write_text


def test_atomic_write_leaves_no_temp_file_and_shares_by_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "metrics.json"
        atomic_write_text(path, "{}")
        atomic_write_text(path, '{"a": 1}')
    finally:
        os.umask(old)
    assert path.read_text() == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by colleagues, not 0600


def test_no_code_unpickles_untrusted_files():
    """Weights load through safetensors; a torch.load anywhere must pass weights_only=True
    (a pickled checkpoint can run code when loaded)."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[2]
    for path in [*root.glob("sparsify/**/*.py"), *root.glob("sweep/**/*.py")]:
        text = path.read_text()
        assert "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
