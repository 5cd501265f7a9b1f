"""The pipeline's closing lines name what a user opens next: report and plots, logs, curves, one "next:"."""

from __future__ import annotations

from types import SimpleNamespace

from data_pipeline.library_log import LOG_DIR_VARIABLE
from launcher.run_summary import summary_lines


def test_summary_names_the_report_plots_logs_curves_and_the_next_command(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "report").mkdir(parents=True)
    (run_dir / "report" / "report.md").write_text("# report\n")
    (run_dir / "report" / "hr_ndcg_at_k.png").write_bytes(b"png")
    (run_dir / "topk").mkdir()
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "libraries.log").write_text("chatter\n")
    monkeypatch.setenv(LOG_DIR_VARIABLE, str(run_dir / "logs"))
    cfg = SimpleNamespace(run_dir=str(run_dir), infer=SimpleNamespace(top_k=20))
    lines = summary_lines(cfg, "configs/demo.yaml", 545.2)
    assert lines[0] == f"done in 9 min 5 s: {run_dir}"
    assert any("report.md" in line and "hr_ndcg_at_k.png" in line for line in lines)
    assert any(line.strip().startswith("logs:") and "libraries.log" in line for line in lines)
    assert f"tensorboard --logdir {run_dir}" in "\n".join(lines)
    assert [line for line in lines if line.startswith("next:")] == [lines[-1]]
    assert "recllm infer configs/demo.yaml" in lines[-1]


def test_a_run_without_report_or_topk_says_to_run_infer(tmp_path, monkeypatch):
    monkeypatch.delenv(LOG_DIR_VARIABLE, raising=False)
    cfg = SimpleNamespace(run_dir=str(tmp_path), infer=SimpleNamespace(top_k=10))
    lines = summary_lines(cfg, "c.yaml", 12.0)
    assert lines[0].startswith("done in 12.0 s")
    assert not any(line.strip().startswith(("report:", "logs:")) for line in lines)
    assert lines[-1] == f"next: recllm infer c.yaml run_dir={tmp_path}"
