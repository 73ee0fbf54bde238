"""Pool logs live in one folder (XDIT_LOG_DIR, else the temp folder's comfyui-xdit-logs), the newest 20 kept."""
import os

from comfyui_xdit_runtime.launcher import Pool, default_log_path


def test_logs_in_one_folder_and_the_oldest_pruned(tmp_path, monkeypatch):
    for i in range(25):
        p = tmp_path / f"pool-old-{i:02d}.log"
        p.write_text("x")
        os.utime(p, (1000 + i, 1000 + i))
    (tmp_path / "notes.txt").write_text("not a pool log")
    new = default_log_path(tmp_path, keep=20)
    assert new.parent == tmp_path and new.name.startswith("pool-") and new.suffix == ".log" and not new.exists()
    left = sorted(p.name for p in tmp_path.glob("pool-*.log"))
    assert left == [f"pool-old-{i:02d}.log" for i in range(6, 25)]  # 19 + the new one = 20
    assert (tmp_path / "notes.txt").exists()
    monkeypatch.setenv("XDIT_LOG_DIR", str(tmp_path / "logs"))
    pool = Pool(2)  # not started: only where its log would go
    assert pool.log_path.parent == tmp_path / "logs" and pool.log_path != default_log_path()
