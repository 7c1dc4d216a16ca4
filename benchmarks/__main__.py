import sys

if sys.argv[1:2] == ["compare"]:
    from benchmarks.compare import main

    main(args=sys.argv[2:], prog_name="python -m benchmarks compare")
else:
    from benchmarks.cli import bench

    bench(prog_name="python -m benchmarks")
