"""Benchmarks: each module measures one part and returns figures keyed as in bench/results.json."""
