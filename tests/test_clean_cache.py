"""make clean-cache: caches listed with their size on disk and last use, removed by age and size, a
dry run by default, never one being built; what killed builds left shown as such and removed; the
labels index left alone."""

import os
import subprocess
import time

import numpy as np

from coco_multilabel.clean_cache import GB, cache_lock, clean, disk_usage, human_size, list_caches, main
from coco_multilabel.data.feature_cache import FeatureCache, leftover_builds, unfinished_folder

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
    one = disk_usage(newest)[0]  # what each takes on disk
    _, chosen, text = clean(tmp_path, keep_gb=1.5 * one / GB, apply=True)
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


def sparse_leftover(cache_dir, key, pid):
    """What a build killed early leaves: arrays created at full size, hardly written (sparse)."""
    folder = cache_dir / f".{key}.{pid}.tmp"
    folder.mkdir(parents=True)
    array = np.lib.format.open_memmap(
        folder / "features.npy", mode="w+", dtype=np.float16, shape=(4000, 8192)
    )
    array[:2] = 1
    del array
    return folder


def test_a_killed_builds_leftover_is_listed_as_such_with_its_size_on_disk_and_removed(tmp_path, capsys):
    leftover = sparse_leftover(tmp_path, "k" * 20, 999999999)  # no such process
    apparent = (leftover / "features.npy").stat().st_size  # 62.5 MB by ls
    on_disk = int(
        subprocess.run(
            ["du", "-k", str(leftover / "features.npy")], capture_output=True, text=True
        ).stdout.split()[0]
    )
    main([str(tmp_path)])  # a dry run without criteria: leftovers are always chosen
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if leftover.name in line]
    assert "left by a killed build: would remove" in line
    assert human_size(on_disk * 1024) in line and human_size(apparent) not in line  # as du says, not ls
    assert "0 caches and 1 leftover" in out and leftover.is_dir()
    main([str(tmp_path), "--yes"])
    assert "left by a killed build: removed" in capsys.readouterr().out
    assert not leftover.exists()


def test_the_next_build_removes_what_killed_builds_of_any_cache_left(tmp_path):
    dead = sparse_leftover(tmp_path, "a" * 20, 999999999)
    alive = sparse_leftover(tmp_path, "b" * 20, os.getpid())  # a build running in this process
    with cache_lock(tmp_path / ("c" * 20)):
        building = unfinished_folder(tmp_path / ("c" * 20))
    assert building.name == f".{'c' * 20}.{os.getpid()}.tmp"
    assert not dead.exists() and alive.is_dir()
    assert leftover_builds(tmp_path) == []  # nor is the one whose process runs


def test_the_labels_index_is_not_a_cache(tmp_path):
    make_cache(tmp_path, "a" * 20, 1000, days_ago=1)
    index = tmp_path / "labels"
    index.mkdir()
    (index / "0123.npz").write_bytes(b"\0" * 5000)
    caches, chosen, text = clean(tmp_path, keep_gb=0, apply=True)
    assert [c.key for c in caches] == ["a" * 20] and index.is_dir()
    assert "1 cache," in text and "labels index" in text and "kept" in text


def test_last_use_is_when_a_run_last_read_the_cache_not_when_it_was_built(tmp_path):
    folder = make_cache(tmp_path, "a" * 20, 0, days_ago=30)
    np.save(folder / "features.npy", np.zeros((2, 4), np.float32))
    (folder / "stems.json").write_text('["x", "y"]')
    old = time.time() - 30 * DAY
    for path in folder.iterdir():
        os.utime(path, (old, old))
    (cache,) = list_caches(tmp_path)
    assert time.time() - cache.last_use > 29 * DAY
    FeatureCache.load(folder)  # a run reads it (a hit: training, report, a sweep job)
    (cache,) = list_caches(tmp_path)
    assert time.time() - cache.last_use < 60
    _, chosen, text = clean(tmp_path, older_than_days=7)
    assert chosen == [] and "just now" in text
