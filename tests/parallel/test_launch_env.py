"""Every supported launcher's variables map to the same torch.distributed environment."""

from __future__ import annotations

from sctd_dist.parallel.launch_env import discover, export


def test_torchrun_and_deepspeed_variables():
    info = discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                     "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "4000"})
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("env", 3, 8, 1)
    assert (info.master_addr, info.master_port) == ("10.1.1.1", 4000)


def test_slurm_variables_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the nodelist is parsed directly
    info = discover({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                     "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "123456"})
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 5, 16, 1)
    assert info.master_addr == "gpu07"
    assert info.master_port == 20000 + 123456 % 20000


def test_slurm_uses_scontrol_when_present(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho nodeA\necho nodeB\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    info = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "weird-list"})
    assert info.master_addr == "nodeA"


def test_explicit_master_addr_wins_over_slurm():
    info = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"})
    assert (info.master_addr, info.master_port) == ("127.0.0.1", 1234)


def test_openmpi_variables():
    info = discover({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                     "OMPI_COMM_WORLD_LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("mpi", 2, 4, 0)


def test_no_launcher_is_single_process():
    info = discover({})
    assert (info.launcher, info.rank, info.world_size) == ("single", 0, 1)


def test_export_writes_torch_distributed_variables():
    env: dict[str, str] = {}
    export(discover({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "h1",
                     "SLURM_LOCALID": "1"}), env)
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "h1"
