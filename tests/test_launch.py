"""The exit code and the message of a `--nproc-per-node` run some of whose workers failed
(d2v.runtime.launch.failed_exit_code), from the launcher's failure records."""
import io
import signal
from types import SimpleNamespace

from d2v.runtime.launch import failed_exit_code


def failure(rank: int, exitcode: int):
    return SimpleNamespace(local_rank=rank, exitcode=exitcode)


def rank_log(logs, rank: int, text: str):
    folder = logs / "attempt_0" / str(rank)
    folder.mkdir(parents=True)
    (folder / "stderr.log").write_text(text)


def test_a_rank_that_exited_with_an_error_gives_the_code(tmp_path):
    rank_log(tmp_path, 1, "Error: the data folder is empty\n")
    err = io.StringIO()
    assert failed_exit_code([failure(0, -signal.SIGTERM), failure(1, 2)], tmp_path, err) == 2
    assert "Process 1 of the run failed" in err.getvalue() and "data folder is empty" in err.getvalue()
    err = io.StringIO()
    assert failed_exit_code([failure(0, 3), failure(1, 2)], tmp_path, err) == 3  # rank 0's own, told by itself
    assert err.getvalue() == ""


def test_a_crashed_rank_is_named_with_its_signal_and_output(tmp_path):
    """A worker killed by a signal the launcher does not send (an abort, a segfault) crashed: its output is shown and
    the code is 128 + the signal, not the SIGTERM the launcher then sent to the others."""
    rank_log(tmp_path, 1, "terminate called after throwing an instance of 'gloo::IoException'\n")
    err = io.StringIO()
    code = failed_exit_code([failure(0, -signal.SIGTERM), failure(1, -signal.SIGABRT)], tmp_path, err)
    assert code == 128 + signal.SIGABRT
    assert "gloo::IoException" in err.getvalue() and "Process 1" in err.getvalue() and "SIGABRT" in err.getvalue()
    err = io.StringIO()  # rank 0's output went to the console already: only the one-line cause
    assert failed_exit_code([failure(0, -signal.SIGSEGV), failure(1, -signal.SIGTERM)], tmp_path, err) == 139
    assert err.getvalue().strip() == "Process 0 of the run was killed by signal 11 (SIGSEGV)."


def test_only_launcher_signals_give_the_lowest_code(tmp_path):
    err = io.StringIO()
    assert failed_exit_code([failure(0, -signal.SIGTERM), failure(1, -signal.SIGKILL)], tmp_path, err) == 137
    assert err.getvalue() == ""
