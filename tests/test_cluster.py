"""raygpt.cluster's look-up of a running local Ray (no Ray started here)."""

from raygpt import cluster


def test_a_recorded_head_that_is_gone_is_not_joined(tmp_path, monkeypatch):
    # `ray start` records its head in <tmp>/ray/ray_current_cluster; a head killed without
    # `ray stop` leaves the file, and `ray.init()` then waited minutes on the dead address.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    assert cluster.running_local_ray() is None


def test_ray_address_is_what_ray_init_joins(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster.running_local_ray() == "10.0.0.5:6379"
