"""The benchmark suite: the plugin as its own process, the kubelet simulator as the load generator, over unix sockets.

Run ``gpuplugin bench <scenario>`` or ``python -m benchmarks <scenario>``; ``--list`` names the scenarios.
"""
