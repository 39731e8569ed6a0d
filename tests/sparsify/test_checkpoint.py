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
