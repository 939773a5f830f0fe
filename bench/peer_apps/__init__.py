"""The 3-hop chain of ``chain_memory.py`` (bench.a -> bench.b -> bench.c ->
bench.d) written for each peer framework in its own documented style, for
``bench/peers.py``.

These modules run in the peers' own virtualenv (``bench/.peers/``), never in
choreo's: the peers are not choreo dependencies, and mypy does not check this
folder (the peer libraries are not installed where it runs). Each module
reads the Redis URL from ``BENCH_REDIS_URL`` when imported, because the peers'
worker commands import an app by name and take no URL.
"""
