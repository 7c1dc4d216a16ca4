"""gpuplugin: a Kubernetes device plugin for GPUs on asyncio, with pluggable backends."""


def package_version() -> str:
    """The installed package's version; ``unknown`` when run from a source tree that was never installed."""
    import importlib.metadata  # here: only --version and the build-info metric need it

    try:
        return importlib.metadata.version("gpuplugin")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
