"""The gateway's cache of text queries' vectors: exact answers, bounded, per artifact version."""

import pytest

from services.gateway import server as gateway_server
from services.gateway.client import Client
from services.gateway.text_cache import TextVectorCache
from services.common.wait_ready import wait_serving


def test_kept_vectors_are_per_version_and_the_least_recently_used_go_first():
    cache = TextVectorCache(2)
    assert cache.get("dog") is None  # no current version known yet
    cache.put("dog", "v1", [1.0])
    cache.current = "v1"
    assert cache.get("dog") == ([1.0], "v1") and cache.get("dog", "v2") is None
    cache.put("cat", "v1", [2.0])
    cache.get("dog")  # dog is now the more recently used
    cache.put("sofa", "v1", [3.0])
    assert cache.get("cat") is None and cache.get("dog") and cache.get("sofa") and len(cache) == 2
    cache.current = "v2"
    assert cache.get("dog") is None and cache.get("dog", "v1") == ([1.0], "v1")
    off = TextVectorCache(0)
    off.put("dog", "v1", [1.0])
    off.current = "v1"
    assert off.get("dog") is None and len(off) == 0
    with pytest.raises(ValueError):
        TextVectorCache(-1)


def test_answers_from_kept_vectors_equal_the_encoders(services):
    """On the real services: a gateway without the cache and one with it answer repeated queries alike."""
    queries = ["dog", "cat sofa", "airplane+sky", "truck:2 road", "dog", "cat sofa"]
    with gateway_server.run_server(0, services.encoder, services.index, text_cache_size=0) as (_, port):
        wait_serving(f"127.0.0.1:{port}")
        with Client(services.gateway) as cached, Client(f"127.0.0.1:{port}") as uncached:
            for _ in range(2):
                for query in queries:
                    one, other = cached.search(query, k=10), uncached.search(query, k=10)
                    assert [(h.id, round(h.score, 5)) for h in one] == [(h.id, round(h.score, 5)) for h in other]
