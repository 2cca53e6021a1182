"""kill -9 during a stream of acknowledged ingests: nothing acknowledged is ever lost."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from conftest import DaemonProc, daemon_env
from palate.errors import PalateError
from palate.keys import KeyManager
from palate.store import Store


def test_acknowledged_events_survive_kill9(home: Path) -> None:
    rnd = random.Random(7)
    acked: set[str] = set()
    counter = 0
    rounds = 6
    for _ in range(rounds):
        d = DaemonProc(home, daemon_env(home)).start()
        stop = threading.Event()

        def writer(w: int, d: DaemonProc = d, stop: threading.Event = stop) -> None:
            nonlocal counter
            try:
                with d.client(timeout=10) as c:
                    while not stop.is_set():
                        counter += 1
                        i = counter
                        if i % 3 == 0:
                            evs = [
                                {
                                    "id": f"b{i}-{k}",
                                    "kind": "pair",
                                    "source": f"w{w}",
                                    "prompt": f"p{i}",
                                    "chosen": f"c{k}",
                                    "rejected": "r",
                                }
                                for k in range(20)
                            ]
                            c.ingest_batch(evs)
                            acked.update(e["id"] for e in evs)  # type: ignore[misc]
                        else:
                            c.ingest(
                                {
                                    "id": f"s{i}",
                                    "kind": "rating",
                                    "source": f"w{w}",
                                    "prompt": "p",
                                    "response": f"r{i}",
                                    "label": 1,
                                }
                            )
                            acked.add(f"s{i}")
            except PalateError:
                pass  # the daemon died mid-request: that request was not acknowledged

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3 + rnd.random() * 0.7)
        d.kill9()
        stop.set()
        for t in threads:
            t.join(10)
        assert d.paths.socket.exists()
    assert len(acked) > 100
    km = KeyManager(d.paths)
    s = Store(d.paths.db_file, km.unwrap())
    stored = [row[0] for row in s._conn.execute("SELECT id FROM events")]
    assert s.integrity_check() == "ok"
    s.close()
    assert len(stored) == len(set(stored)), "no duplicates"
    missing = acked - set(stored)
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"
    # And the daemon starts cleanly on the same home afterwards.
    d = DaemonProc(home, daemon_env(home)).start()
    with d.client() as c:
        assert c.status()["events"]["total"] == len(stored)
    d.terminate()
