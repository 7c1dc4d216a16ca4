"""Dynamic Resource Allocation: the same backends' GPUs served to the kubelet's DRA manager and the API server."""
