"""``python -m cachefit.bench solvers ...``: the benchmark CLI without the ``cachefit`` entry point."""

from cachefit.cli_bench import bench

if __name__ == "__main__":
    bench(prog_name="python -m cachefit.bench")
