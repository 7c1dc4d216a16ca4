"""A kubelet to try plugins against: the simulator behind the tests, the demo, the benchmarks and
``gpuplugin kubelet``.
"""
