import streamwise


def test_all_is_exactly_the_public_api():
    """__all__ lists exactly the public names the package exports, nothing more."""
    public = {name for name in dir(streamwise) if not name.startswith("_")}
    submodules = {
        "actors", "autoscaling", "batching", "codec", "config", "exceptions", "metrics", "objectstore", "proto", "routing", "streaming",
        "tracing",
    }
    assert set(streamwise.__all__) == public - submodules
    assert {"run", "shutdown", "deployment", "DeploymentHandle", "get_request_context", "put", "get", "ObjectRef"} <= set(streamwise.__all__)
