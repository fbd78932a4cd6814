"""benchmarks/gpu.sh on an air-gapped node, for real: the wheel folder made by `--fetch-wheels`
installs with the network cut (a new network namespace) into an environment that already holds
a torch and a transformers of another version than ours, and the CPU smoke run then trains.

It needs what `make setup` needs (the package registry) to fill the wheel folder, and a network
namespace (`unshare --net`, as root or through a user namespace) to cut the network.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from packaging.requirements import Requirement

from tests.training.launch import REPO, env

# Another transformers than constraints.txt's, as a node's image may hold (>= the 4.40 we need).
PREINSTALLED_TRANSFORMERS = "transformers==5.17.0"


def _cut_network() -> list[str]:
    """The command prefix that runs a command in a new network namespace with only loopback up
    (torchrun's rendezvous needs it)."""
    assert shutil.which("ip"), "`ip` (iproute2) is missing: `make setup` installs it as root"
    for prefix in (["unshare", "--net"], ["unshare", "--net", "--map-root-user"]):
        probe = subprocess.run([*prefix, "true"], capture_output=True)
        if probe.returncode == 0:
            return [*prefix, "sh", "-c", 'ip link set lo up && exec "$@"', "offline"]
    raise AssertionError("cannot make a network namespace here (`unshare --net` and "
                         "`unshare --net --map-root-user` both fail): this test needs one")


def _preinstall_torch(venv: Path) -> None:
    """The node's torch, as its image holds it: this interpreter's own, linked in (never
    uninstalled: gpu.sh pins an installed torch)."""
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    dist = importlib.metadata.distribution("torch")
    tops = {Path(f.parts[0]) for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}
    for top in tops:
        (site / top).symlink_to(Path(str(dist.locate_file(top))).resolve())


def _torch_requirements() -> list[str]:
    """What the installed torch asks for on this machine (installed beside it on the node)."""
    reqs = [Requirement(r) for r in importlib.metadata.requires("torch") or []]
    return [str(r) for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def _copy_checkout(dest: Path) -> None:
    """What a clean clone holds (tracked and unignored files; no .venv), from the working tree."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_the_wheel_folder_installs_offline_beside_a_preinstalled_torch_and_trains(tmp_path: Path) -> None:
    run_env = env()
    py_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels = tmp_path / "wheels"
    fetch = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--fetch-wheels", str(wheels)],
                           env={**run_env, "PY_VERSION": py_version}, capture_output=True, text=True,
                           timeout=600)
    assert fetch.returncode == 0, fetch.stdout[-3000:] + fetch.stderr[-3000:]
    names = {w.name.split("-")[0].lower() for w in wheels.glob("*.whl")}
    assert {"deepspeed", "megatron_core", "datasets", "pyarrow", "hjson"} <= names
    assert not names & {"torch", "triton"} and not any(n.startswith("nvidia") for n in names)

    # The node: a fresh environment holding torch and an older transformers (with its own deps).
    venv = tmp_path / "node"
    base = Path(sysconfig.get_config_var("BINDIR")) / "python3"
    subprocess.run([str(base), "-m", "venv", str(venv)], check=True, timeout=120)
    _preinstall_torch(venv)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", PREINSTALLED_TRANSFORMERS,
                    *_torch_requirements()],
                   env=run_env, check=True, capture_output=True, timeout=300)

    checkout = tmp_path / "checkout"
    _copy_checkout(checkout)
    # Only the wheel folder: this machine's pip configuration (its local wheel folders and
    # indexes) stays out, and the network is cut.
    offline_env = {**run_env, "PIP_CONFIG_FILE": os.devnull, "SCTD_WHEELHOUSE": str(wheels),
                   "PYTHON": str(python)}
    proc = subprocess.run(
        [*_cut_network(), "bash", str(checkout / "benchmarks" / "gpu.sh"), "--device-kind", "cpu",
         "--model", "tiny", "--seqs", "64", "--tp", "1", "--modes", "none", "--train-iters", "3",
         "--warmup", "1", "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")],
        cwd=checkout, env=offline_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"adding the benchmark's packages to {python}" in proc.stdout

    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert result["complete"] is True and [a["status"] for a in result["arms"]] == ["ok"]
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], env=offline_env,
                               capture_output=True, text=True, check=True).stdout.splitlines()
    # The node's torch and transformers were used as they were; ours came from the folder.
    assert f"torch=={importlib.metadata.version('torch')}" in installed
    assert PREINSTALLED_TRANSFORMERS in installed
    assert "deepspeed==0.19.8" in installed and "megatron-core==0.16.1" in installed
