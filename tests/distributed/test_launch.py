import pytest

pytestmark = pytest.mark.distributed


def test_embedded_ray_binds_to_loopback_only(ray_session):
    import ray

    nodes = ray.nodes()
    assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]
    url = ray._private.worker._global_node.webui_url  # the dashboard, if any
    assert url is None or url.startswith("127.0.0.1:")
