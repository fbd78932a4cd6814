"""`sctd_dist.allocator`: which allocator a launch gets, the environment it builds, and that a
command started through it (or a script that restarts itself) really runs with it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from sctd_dist import allocator
from tests.training.launch import REPO, env


def test_choice_follows_the_preference_order_and_the_override() -> None:
    present = [name for name in ("tcmalloc", "jemalloc") if allocator.find_library(name)]
    auto = allocator.choose({})
    assert auto.name == (present[0] if present else "glibc")
    assert (auto.library is None) == (not present)
    glibc = allocator.choose({allocator.ENV_CHOICE: "glibc"})
    assert glibc.library is None and glibc.settings["MALLOC_MMAP_MAX_"] == "0"
    assert allocator.choose({allocator.ENV_CHOICE: "system"}) == allocator.Allocator("system")
    for name in present:
        assert allocator.choose({allocator.ENV_CHOICE: name}).name == name


def test_a_wrong_or_missing_choice_names_the_fix() -> None:
    with pytest.raises(ValueError, match="SCTD_ALLOCATOR='nope' is not one of auto, tcmalloc"):
        allocator.choose({allocator.ENV_CHOICE: "nope"})
    for name, package in (("tcmalloc", "libtcmalloc-minimal4"), ("jemalloc", "libjemalloc2")):
        if allocator.find_library(name) is None:
            with pytest.raises(ValueError, match=f"apt-get install {package}"):
                allocator.choose({allocator.ENV_CHOICE: name})


def test_environment_keeps_what_the_caller_set() -> None:
    lib = allocator.Allocator("jemalloc", "/usr/lib/libjemalloc.so.2", {"MALLOC_CONF": "mine:no"})
    out = allocator.environment(lib, {"LD_PRELOAD": "/opt/other.so", "MALLOC_CONF": "theirs", "X": "1"})
    assert out["LD_PRELOAD"] == "/usr/lib/libjemalloc.so.2 /opt/other.so"
    assert out["MALLOC_CONF"] == "theirs" and out["X"] == "1"
    again = allocator.environment(lib, out)  # applying twice preloads once
    assert again["LD_PRELOAD"] == out["LD_PRELOAD"]
    glibc = allocator.choose({allocator.ENV_CHOICE: "glibc"})
    assert allocator.environment(glibc, {})["MALLOC_TRIM_THRESHOLD_"] == str(4 << 30)


PROBE = "from sctd_dist.allocator import in_use; print(in_use())"


def _clean_env(**extra: str) -> dict[str, str]:
    """The test environment without any allocator setting this test run itself may have."""
    e = dict(env(), **extra)
    for key in ("LD_PRELOAD", "SCTD_ALLOCATOR_APPLIED", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                "MALLOC_TOP_PAD_"):
        e.pop(key, None)
    return e


def _expected(choice: allocator.Allocator) -> str:
    return {"glibc": "glibc malloc, tuned"}.get(choice.name, choice.name)


@pytest.mark.parametrize("forced", ["auto", "glibc"])
def test_a_command_runs_under_the_chosen_allocator(forced: str) -> None:
    e = _clean_env(**{allocator.ENV_CHOICE: forced})
    proc = subprocess.run([sys.executable, "-m", "sctd_dist.allocator", "--", sys.executable, "-c", PROBE],
                          cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    choice = allocator.choose(e)
    assert proc.stderr.startswith(f"allocator: {choice.describe()}")
    assert proc.stdout.startswith(_expected(choice)), proc.stdout
    # Without the wrapper the same probe reports the system allocator.
    plain = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=e, capture_output=True,
                           text=True, timeout=120)
    assert plain.stdout.strip() == "system default malloc"


def test_a_script_restarts_itself_under_the_allocator(tmp_path) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys
        from sctd_dist.allocator import reexec_with_tuned_allocator, in_use
        reexec_with_tuned_allocator()
        print(in_use(), sys.argv[1:])
    """))
    e = _clean_env(PYTHONPATH=str(REPO), **{allocator.ENV_CHOICE: "glibc"})
    proc = subprocess.run([sys.executable, str(script), "--flag", "x"], env=e, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("glibc malloc, tuned") and "['--flag', 'x']" in proc.stdout
    assert "restarting under it" in proc.stderr
    opted_out = dict(e, **{allocator.ENV_CHOICE: "system"})
    proc = subprocess.run([sys.executable, str(script)], env=opted_out, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.startswith("system default malloc") and "restarting" not in proc.stderr


def test_a_bad_choice_stops_the_launch_with_one_line() -> None:
    e = _clean_env(**{allocator.ENV_CHOICE: "nope"})
    proc = subprocess.run([sys.executable, "-m", "sctd_dist.allocator", "--", "true"], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: SCTD_ALLOCATOR='nope' is not one of auto, tcmalloc, jemalloc, glibc, system"]
