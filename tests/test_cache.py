from napari_apformer.engine.cache import ByteLRU


def test_least_recently_used_items_go_first_by_bytes():
    cache = ByteLRU[str](max_bytes=10)
    cache.put("a", "A", 4)
    cache.put("b", "B", 4)
    assert cache.get("a") == "A"  # now b is the oldest
    cache.put("c", "C", 4)
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C"
    assert cache.nbytes == 8 and len(cache) == 2
    cache.put("huge", "H", 11)
    assert cache.get("huge") is None and len(cache) == 2
    assert (cache.hits, cache.misses) == (3, 2)
