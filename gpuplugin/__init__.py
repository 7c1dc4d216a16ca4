"""gpuplugin: a Kubernetes device plugin for GPUs on asyncio, with pluggable backends."""
