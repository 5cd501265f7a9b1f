"""Other libraries' chatter goes to run_dir/logs/libraries.log; recllm's own lines stay on the console.

Each case runs in a fresh interpreter, as a stage does, so the logging set-up of one case cannot leak into another.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO


def _run(code: str, tmp_path, verbose: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RECLLM_LOG_DIR", None)
    env.pop("RECLLM_RAY_VERBOSE", None)
    if verbose:
        env["RECLLM_RAY_VERBOSE"] = "1"
    script = textwrap.dedent(f"""
        import logging, warnings
        from data_pipeline.library_log import set_log_dir, route_library_logs, prints_to_log, import_quietly
        set_log_dir({str(tmp_path / 'run')!r})
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)


def test_library_loggers_and_warnings_go_to_the_file_and_recllm_stays_on_the_console(tmp_path):
    done = _run("""
        logging.basicConfig(level=logging.WARNING)
        console = logging.getLogger("ray.data")
        console.addHandler(logging.StreamHandler())  # as Ray Data does for itself
        route_library_logs()
        logging.getLogger("ray.data").warning("Progress bars disabled")
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU")
        logging.getLogger("transformers.modeling_utils").warning("loading weights")
        warnings.warn("a deprecation notice", FutureWarning)
        logging.getLogger("recllm.train").warning("recllm's own warning")
        with prints_to_log():
            print("DeepSpeed shm op built successfully")
        print("stage train")
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "run" / "logs" / "libraries.log").read_text()
    for line in ("Progress bars disabled", "Setting accelerator to CPU", "loading weights", "a deprecation notice",
                 "built successfully"):
        assert line in log
        assert line not in done.stdout + done.stderr
    assert "recllm's own warning" in done.stderr and "recllm's own warning" not in log
    assert done.stdout.strip() == "stage train"


def test_a_library_imported_quietly_keeps_writing_to_the_file(tmp_path):
    # a library that prints while it loads and gives itself a console handler then, as DeepSpeed does
    (tmp_path / "chatty_lib.py").write_text(
        "import logging\nprint('accelerator notice at import')\nlogger = logging.getLogger('chatty_lib')\n"
        "logger.addHandler(logging.StreamHandler())\nlogger.propagate = False\n")
    done = _run(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import_quietly("chatty_lib")
        logging.getLogger("chatty_lib").warning("later chatter")
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "run" / "logs" / "libraries.log").read_text()
    assert "accelerator notice at import" in log and "later chatter" in log
    assert "accelerator notice" not in done.stdout and "later chatter" not in done.stderr


def test_verbose_keeps_everything_on_the_console(tmp_path):
    done = _run("""
        route_library_logs()
        logging.getLogger("DeepSpeed").addHandler(logging.StreamHandler())
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU")
        with prints_to_log():
            print("built successfully")
    """, tmp_path, verbose=True)
    assert done.returncode == 0, done.stderr
    assert "Setting accelerator to CPU" in done.stderr and "built successfully" in done.stdout


def test_a_command_that_logs_nothing_leaves_no_logs_folder(tmp_path):
    done = _run("""
        route_library_logs()
        logging.getLogger("recllm.prepare").warning("a data problem, recllm's own line")
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "run").exists()
