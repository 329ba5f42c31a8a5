"""make clean-cache: caches listed with size and last use, removed by age and size, a dry run by
default, never one being built."""

import os
import time

from coco_multilabel.clean_cache import GB, cache_lock, clean, main

DAY = 86400


def make_cache(cache_dir, key, size, days_ago):
    folder = cache_dir / key
    folder.mkdir(parents=True)
    (folder / "features.npy").write_bytes(b"\0" * size)
    (folder / "stems.json").write_text("[]")
    when = time.time() - days_ago * DAY
    for path in (*folder.iterdir(), folder):
        os.utime(path, (when, when))
    return folder


def test_a_dry_run_lists_every_cache_and_deletes_nothing(tmp_path, capsys):
    old = make_cache(tmp_path, "a" * 20, 3000, days_ago=40)
    new = make_cache(tmp_path, "b" * 20, 1000, days_ago=1)
    main([str(tmp_path), "--older-than", "30"])
    out = capsys.readouterr().out
    assert "a" * 20 in out and "b" * 20 in out and "40.0 days ago" in out
    assert "would remove 1" in out and "add --yes" in out
    assert old.is_dir() and new.is_dir()


def test_older_than_removes_the_unused_ones(tmp_path):
    old = make_cache(tmp_path, "old", 3000, days_ago=40)
    new = make_cache(tmp_path, "new", 1000, days_ago=1)
    _, chosen, _ = clean(tmp_path, older_than_days=30, apply=True)
    assert [c.folder for c in chosen] == [old]
    assert not old.exists() and new.is_dir()


def test_keep_gb_removes_the_least_recently_used_until_the_rest_fits(tmp_path):
    oldest = make_cache(tmp_path, "oldest", 1000, days_ago=3)
    middle = make_cache(tmp_path, "middle", 1000, days_ago=2)
    newest = make_cache(tmp_path, "newest", 1000, days_ago=1)
    _, chosen, text = clean(tmp_path, keep_gb=1500 / GB, apply=True)  # 1,002 bytes each with stems.json
    assert [c.folder for c in chosen] == [oldest, middle]
    assert newest.is_dir() and not oldest.exists() and not middle.exists()
    assert "removed 2" in text


def test_a_cache_being_built_is_never_removed(tmp_path):
    locked = make_cache(tmp_path, "locked", 100, days_ago=50)
    building = make_cache(tmp_path, f".tmpkey.{os.getpid()}.tmp", 100, days_ago=50)  # this process builds it
    dead = make_cache(tmp_path, ".deadkey.999999999.tmp", 100, days_ago=50)  # left by a killed build
    with cache_lock(locked).acquire():
        caches, chosen, text = clean(tmp_path, older_than_days=1, keep_gb=0, apply=True)
    assert locked.is_dir() and building.is_dir() and not dead.exists()
    assert [c.folder for c in chosen] == [dead]
    assert text.count("building: kept") == 2
