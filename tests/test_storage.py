"""cleanup-hidden-states: deletes only the sample files of finished captures, says how much."""

import json

from speculators.cli import main


def _capture(folder, n=3, size=1000):
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"data_{i}.pt").write_bytes(b"x" * size)
    (folder / "data_config.json").write_text("{}")
    (folder / "capture_settings.json").write_text("{}")


def test_cleanup_deletes_samples_keeps_config_and_reports_bytes(tmp_path):
    a, b = tmp_path / "hs" / "a", tmp_path / "hs" / "b"
    _capture(a, n=3, size=1000)
    _capture(b, n=2, size=500)
    out = tmp_path / "cleanup.json"
    assert (
        main(["cleanup-hidden-states", "--hidden-states", str(a), str(b), "--output", str(out)])
        == 0
    )
    summary = json.loads(out.read_text())
    assert summary["bytes_freed"] == 3 * 1000 + 2 * 500
    assert summary["folders"][str(a)] == {"files": 3, "bytes": 3000}
    assert not list(a.glob("data_*.pt")) and not list(b.glob("data_*.pt"))
    assert (a / "data_config.json").is_file() and (a / "capture_settings.json").is_file()
    # Again: nothing left to free, still a valid summary.
    assert main(["cleanup-hidden-states", "--hidden-states", str(a), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["bytes_freed"] == 0


def test_unfinished_capture_is_refused_before_anything_is_deleted(tmp_path, capsys):
    done, partial = tmp_path / "done", tmp_path / "partial"
    _capture(done)
    _capture(partial)
    (partial / "data_config.json").unlink()  # a capture that never finished
    out = tmp_path / "cleanup.json"
    rc = main(
        ["cleanup-hidden-states", "--hidden-states", str(done), str(partial), "--output", str(out)]
    )
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("no data_config.json: not a finished capture, not deleting")
    assert str(partial) in err and "\n" not in err
    assert len(list(done.glob("data_*.pt"))) == 3  # nothing deleted anywhere
    assert not out.exists()


def test_missing_folder_is_one_line_error(tmp_path, capsys):
    out = tmp_path / "cleanup.json"
    assert (
        main(
            [
                "cleanup-hidden-states",
                "--hidden-states",
                str(tmp_path / "nope"),
                "--output",
                str(out),
            ]
        )
        == 1
    )
    assert "no such hidden-states folder" in capsys.readouterr().err
    assert not out.exists()
