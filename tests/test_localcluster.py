"""The cluster launchers' input checks, without starting Ray: whole CPU counts, state files that `start`/`up` refuse
to overwrite, and the hostfile format (rlhf_ray/localcluster.py, rlhf_ray/hostfile_cluster.py)."""

from __future__ import annotations

import pytest

from rlhf_ray import hostfile_cluster, localcluster
from rlhf_ray.hostfile_cluster import HostfileCluster, parse_hostfile


@pytest.mark.parametrize("argv, message", [
    (["start", "--pool", "gen=1.5"], "--pool gen=1.5: a node's CPU count must be a whole number"),
    (["start", "--head_cpus", "0.5"], "--head_cpus 0.5: a node's CPU count must be a whole number"),
    (["start", "--pool", "gen"], "--pool expects NAME=CPUS, got 'gen'"),
])
def test_localcluster_refuses_fractional_cpus_by_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        localcluster.main(argv)
    assert message in capsys.readouterr().err


def test_localcluster_start_refuses_an_existing_state_file(tmp_path, capsys):
    state = tmp_path / "cluster.json"
    state.write_text("{}")
    assert localcluster.main(["start", "--pool", "gen=1", "--state", str(state)]) == 1   # before starting anything
    assert f"--state {state}: a cluster is already recorded there" in capsys.readouterr().err
    assert state.read_text() == "{}"
    assert localcluster.main(["stop", "--state", str(tmp_path / "none.json")]) == 1


def test_localcluster_dashboard_is_loopback_by_default():
    assert localcluster.LocalCluster().dashboard_host == "127.0.0.1"


def test_hostfile_lines_give_address_pool_and_resources():
    hosts = parse_hostfile("# head first\n10.0.0.1 head\n\nroot@10.0.0.2  train cpus=32 gpus=8  # trainers\n"
                           "gen-node-3 gen gpus=4 object_store_mb=512\n")
    assert [(h.address, h.pool, h.resources) for h in hosts] == [
        ("10.0.0.1", "head", {}), ("root@10.0.0.2", "train", {"cpus": 32, "gpus": 8}),
        ("gen-node-3", "gen", {"gpus": 4, "object_store_mb": 512})]
    assert [h.ip for h in hosts] == ["10.0.0.1", "10.0.0.2", None]   # a host name: Ray finds its IP


@pytest.mark.parametrize("text, message", [
    ("10.0.0.1 head cpus=1.5\n", "line 1: 'cpus=1.5': expected KEY=N"),
    ("10.0.0.1 head\n10.0.0.2 train gen\n", "line 2: 'gen': a host has one pool (already 'train')"),
    ("10.0.0.1 head tpus=4\n", "line 1: 'tpus=4': expected KEY=N with KEY in ('cpus', 'gpus', 'object_store_mb')"),
    ("# nothing\n", "no hosts"),
])
def test_hostfile_errors_name_the_line(text, message):
    with pytest.raises(ValueError) as info:
        parse_hostfile(text)
    assert message in str(info.value)


def test_cluster_up_refuses_an_existing_state_file(tmp_path, capsys):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("10.0.0.1 head\n")
    (tmp_path / "mine.json").write_text("{}")
    argv = ["up", "--hostfile", str(hostfile), "--name", "mine", "--state_dir", str(tmp_path), "--runner", "false"]
    assert hostfile_cluster.main(argv) == 1
    assert "a cluster named 'mine' is already recorded" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == "{}"


def test_cluster_up_reports_a_host_it_cannot_reach_and_leaves_nothing(tmp_path, capsys):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("10.0.0.1 head\n")
    assert hostfile_cluster.main(["up", "--hostfile", str(hostfile), "--name", "x", "--state_dir", str(tmp_path),
                                  "--runner", "false {host}"]) == 1
    assert "false 10.0.0.1 sh -s on 10.0.0.1 exited 1" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts.txt"]   # no state, no token left behind
    assert HostfileCluster(parse_hostfile("h\n")).runner.startswith("ssh")
