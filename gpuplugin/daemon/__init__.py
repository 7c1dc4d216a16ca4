"""The node agent: the manager of resource servers, configuration and its reload, metrics, probes and the
process itself.
"""
