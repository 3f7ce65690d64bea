"""Reading cgroup limits (v2 and v1) from fake cgroup trees."""

from __future__ import annotations

from fedhive.simulation.limits import NodeLimits, cgroup_limits, node_limits


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_tightest_limit_up_the_tree(tmp_path):
    root = tmp_path / "cg"
    write(root / "cgroup.controllers", "cpu memory\n")
    write(root / "job" / "cpu.max", "max 100000\n")
    write(root / "job" / "memory.max", str(8 << 30))
    write(root / "job" / "step" / "cpu.max", "150000 100000\n")
    write(root / "job" / "step" / "memory.max", "max\n")
    write(tmp_path / "self", "0::/job/step\n")
    assert cgroup_limits(root, tmp_path / "self") == NodeLimits(cpus=1.5, memory=8 << 30)


def test_cgroup_v1_quota_and_memory_limit(tmp_path):
    root = tmp_path / "cg"
    write(root / "cpu,cpuacct" / "slurm" / "cpu.cfs_quota_us", "200000\n")
    write(root / "cpu,cpuacct" / "slurm" / "cpu.cfs_period_us", "100000\n")
    write(root / "memory" / "slurm" / "memory.limit_in_bytes", str(4 << 30))
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # no limit
    write(tmp_path / "self", "4:memory:/slurm\n2:cpu,cpuacct:/slurm\n1:name=systemd:/\n")
    assert cgroup_limits(root, tmp_path / "self") == NodeLimits(cpus=2.0, memory=4 << 30)


def test_no_cgroup_means_no_limits_and_the_node_view_is_bounded(tmp_path):
    assert cgroup_limits(tmp_path / "none", tmp_path / "none") == NodeLimits()
    here = node_limits()
    assert here.cpus is not None and here.cpus >= 1
    assert here.memory is None or here.memory > 0
