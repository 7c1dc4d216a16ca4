from benchmarks.cli import bench

bench()
