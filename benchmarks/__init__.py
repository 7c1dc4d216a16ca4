"""The benchmark suite: the plugin as its own process, the kubelet simulator as the load generator, over unix sockets.

Run ``python -m benchmarks <scenario>`` from a checkout; ``--list`` names the scenarios.
On a GPU node, ``python -m benchmarks nvml --backend nvml`` runs the plugin on the real GPUs, and
``python -m benchmarks.nvml_figures`` measures the NVML backend itself (discovery, idle CPU, health-event delay).
``python -m benchmarks.medians DIR...`` puts several runs' results side by side, with the median of each figure;
``python -m benchmarks compare OLD NEW`` says which figures changed beyond the noise, and fails on a regression.
"""
