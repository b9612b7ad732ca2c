"""`ebslab tune --storage postgresql+psycopg2://...`: several workers share one study through a real PostgreSQL
server, pgserver's (a self-contained PostgreSQL from PyPI; with psycopg2 in the `tune-db` extra, which `make test`
and `make test-slow` install). A missing server package fails these tests: skipped, they would never run in CI."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import optuna
import pytest
from conftest import hang_after, install_fake_train
from test_tune import FAKE_TRAIN, read_study, study_with, write_study

from ebslab.experiments import tune

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pg_server():
    try:
        import pgserver
        import psycopg2  # noqa: F401  (the driver the URLs name)
    except ImportError as e:
        pytest.fail(f"{e.name} is missing: pip install -e '.[tune-db]' (make test installs it)")
    # As root, pgserver runs the server as its own system user 'pgserver' (PostgreSQL refuses root) and opens the
    # folders above the data for it; not under pytest's base folder, which each new pytest session closes again
    # (0700), so a second session on the machine would lock pg_ctl out of the data before the stop
    server = pgserver.get_server(Path(tempfile.mkdtemp(prefix="ebslab-pg-")) / "data", cleanup_mode="delete")
    yield server
    server.cleanup()
    shutil.rmtree(server.pgdata.parent, ignore_errors=True)


def fresh_database(server, name: str) -> str:
    """A new empty database on the server; its SQLAlchemy URL (a Unix socket, no TCP port to collide on)."""
    import psycopg2

    conn = psycopg2.connect(server.get_uri())
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        conn.cursor().execute(f"CREATE DATABASE {name}")
    finally:
        conn.close()
    return server.get_uri(database=name).replace("postgresql://", "postgresql+psycopg2://", 1)


def test_workers_opening_a_fresh_database_at_once_all_get_the_storage(pg_server):
    # every worker of a cluster study starts with the same command, often at the same second: on a fresh
    # database they all create Optuna's tables at once, and PostgreSQL refuses all CREATEs but the first
    url = fresh_database(pg_server, "race")
    n = 6
    barrier, errors, storages = threading.Barrier(n), [], []

    def open_it() -> None:
        barrier.wait()
        try:
            storages.append(tune.open_storage(url, heartbeat_s=5))
        except Exception as e:
            errors.append(str(e))

    threads = [threading.Thread(target=open_it) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(hang_after(30))
    assert errors == [] and len(storages) == n
    study = optuna.create_study(study_name="s", storage=storages[0])
    assert [s.get_study_id_from_name("s") for s in storages] == [study._study_id] * n
    import psycopg2

    conn = psycopg2.connect(pg_server.get_uri(database="race"))
    try:
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM alembic_version")
        assert cur.fetchone() == (1,)  # one schema version, not one per worker
        cur.execute("SELECT count(*) FROM version_info")
        assert cur.fetchone() == (1,)
    finally:
        conn.close()


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_two_workers_of_one_study_draw_different_parameters(sampler):
    spec = tune.parse_study(study_with(sampler=sampler))
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="st", storage=storage, direction=spec.direction)
    workers = [optuna.load_study(study_name="st", storage=storage, sampler=tune.make_sampler(spec))
               for _ in range(2)]
    space = {p.key: p.distribution() for p in spec.space}
    first = [w.ask(space).params["optim.lr"] for w in workers]
    assert first[0] != first[1]


# Each worker is `ebslab tune` in its own interpreter, with the fake `ebslab train` of test_tune.py in place of
# the real one. Both hold a trial before either runs one, so each takes part however fast the other starts.
WORKER = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from ebslab.experiments import sweep as sw
    real, ready = sw.train_command, Path({ready!r})
    def train_command(*a, **k):
        mark = ready / str(os.getpid())
        if not mark.exists():
            mark.write_text("")
            deadline = time.time() + {wait!r}
            while len(list(ready.iterdir())) < 2 and time.time() < deadline:
                time.sleep(0.05)
        return [sys.executable, {script!r}] + real(*a, **k)[4:]
    sw.train_command = train_command
    from ebslab.experiments.tune import workers
    workers.POLL_S = 0.2  # how often a worker that has no trial left looks for the other's end: no 2 s waits
    from ebslab.cli import main
    sys.exit(main(sys.argv[1:]))
''')


@pytest.mark.slow  # two `ebslab tune` interpreters, each importing torch through the CLI: 40-60 s here
@pytest.mark.timeout(120)
def test_two_workers_share_one_study_through_postgresql(tmp_path, monkeypatch, pg_server):
    fake_train = install_fake_train(tmp_path, monkeypatch, FAKE_TRAIN)
    url = fresh_database(pg_server, "shared")
    trials = 5
    path = write_study(tmp_path, study_with(trials=trials, confirm={"top_k": 2, "seeds": [11, 12]}))
    ready = tmp_path / "ready"
    ready.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(ready=str(ready), wait=hang_after(10), script=str(fake_train)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    cmd = [sys.executable, str(worker), "tune", str(path), "--out", str(tmp_path / "runs"), "--storage", url]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=hang_after(60))[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs

    # the study in the database: exactly the asked trials, each completed once, by both workers
    study = optuna.load_study(study_name="st", storage=url)
    search = [t for t in study.trials if not t.user_attrs.get("over_budget")]
    assert sorted(t.number for t in search) == list(range(trials))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in search)
    workers = {f"{socket.gethostname()}:{p.pid}" for p in procs}
    # a worker id is host:pid:token (the token tells a resumed call in the same process from the stopped one)
    assert {t.user_attrs["worker"].rsplit(":", 1)[0] for t in search} == workers

    # what each worker says it ran: disjoint, together every trial folder, at least one each
    ran = [{line.split()[1].rstrip(":") for line in o.splitlines() if line.startswith("search trial-")} for o in outs]
    assert ran[0] and ran[1] and not ran[0] & ran[1], outs
    folders = [f"trial-{i:04d}" for i in range(trials)]
    assert sorted(ran[0] | ran[1]) == folders
    by_worker = {t.user_attrs["folder"]: t.user_attrs["worker"] for t in search}
    for p, mine in zip(procs, ran):
        assert {f for f, w in by_worker.items() if w.rsplit(":", 1)[0].endswith(f":{p.pid}")} == mine

    # the folders: one per trial, each run once; study.json indexes them all and the confirmation
    root = tmp_path / "runs" / "st"
    assert sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.startswith("trial-")) == folders
    index = read_study(root)
    assert [t["folder"] for t in index["trials"]] == folders
    assert [t["number"] for t in index["trials"]] == list(range(trials))
    assert all(t["status"] == "completed" for t in index["trials"])
    for t in index["trials"]:
        assert (root / t["folder"] / "attempts").read_text() == f"new {t['number']}\n"
    runs = index["confirm"]["runs"]
    assert len(index["confirm"]["configs"]) == 2
    assert sorted((r["config"], r["seed"]) for r in runs) == sorted(
        (c, s) for c in index["confirm"]["configs"] for s in (11, 12))
    for r in runs:
        assert r["status"] == "completed"
        assert (root / r["folder"] / "attempts").read_text() == "new -\n"
    assert index["storage"].startswith("postgresql+psycopg2://") and "/shared?" in index["storage"]
    assert index["counts"] == {"completed": trials}
