"""One run per output: the lease on local disk and on the real S3 server (conditional writes)."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from captioning.lease import Lease, LeaseHeld
from captioning.storage import Storage


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """(storage, lease uri) on local disk or in SeaweedFS."""
    if request.param == "local":
        return Storage(), str(tmp_path / "out" / "_lease.json")
    seaweed = request.getfixturevalue("seaweed")
    return Storage(client=seaweed.client()), f"s3://outputs/{tmp_path.name}/_lease.json"


def test_a_live_lease_refuses_a_second_run_and_is_released(place):
    storage, where = place
    with Lease(storage, where, log=lambda _: None, what="batch run") as first:
        with pytest.raises(LeaseHeld, match=r"another batch run is writing this output: host \S+, pid \d+"):
            Lease(storage, where, log=lambda _: None).acquire()
        assert json.loads(storage.read_tagged(where)[0])["id"] == first.id
    assert storage.read_tagged(where) is None  # released
    with Lease(storage, where, log=lambda _: None):  # and free for the next run
        pass


def test_heartbeat_renews_and_a_stale_lease_is_taken_over(place):
    storage, where = place
    holder = Lease(storage, where, heartbeat=0.2, log=lambda _: None).acquire()
    first_beat = json.loads(storage.read_tagged(where)[0])["heartbeat"]
    time.sleep(0.7)
    assert json.loads(storage.read_tagged(where)[0])["heartbeat"] > first_beat  # renewed
    holder._stop.set()  # the holder hangs: no more heartbeats
    holder._thread.join()
    time.sleep(2.2)  # S3 stamps objects to the second: the storage's own age is then over 1 s
    logs = []
    taker = Lease(storage, where, stale_after=1.0, log=logs.append).acquire()
    try:
        assert any("took over a stale lease" in line and "last heartbeat" in line for line in logs)
        assert json.loads(storage.read_tagged(where)[0])["id"] == taker.id
        # The old holder's next beat finds the lease gone to another run (its conditional write is refused).
        holder.log = logs.append
        assert not holder.renew() and holder.lost
        assert any("lost the lease" in line for line in logs)
        assert json.loads(storage.read_tagged(where)[0])["id"] == taker.id
    finally:
        taker.release()


def test_only_one_of_many_simultaneous_takers_wins(place):
    storage, where = place
    results, barrier = [], threading.Barrier(6)

    def take():
        barrier.wait()
        try:
            results.append(Lease(storage, where, log=lambda _: None).acquire())
        except LeaseHeld:
            results.append(None)

    threads = [threading.Thread(target=take) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [lease for lease in results if lease is not None]
    assert len(results) == 6 and len(winners) == 1
    winners[0].release()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    where = str(tmp_path / "_lease.json")
    code = ("import sys, time; from captioning.lease import Lease; from captioning.storage import Storage; "
            f"Lease(Storage(), {where!r}, log=print).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld):
            Lease(Storage(), where, log=lambda _: None).acquire()  # alive: refused
    finally:
        holder.kill()
        holder.wait()
    logs = []
    Lease(Storage(), where, stale_after=3600, log=logs.append).acquire().release()
    assert any("its process is gone" in line for line in logs)


def foreign(storage, where, **fields):
    """A lease written by another run: a record with these fields, its storage time now."""
    from captioning.lease import this_process

    record = {"id": "other", **this_process(), "started": "t", "what": "batch run", **fields}
    storage.write_bytes(where, json.dumps(record).encode())


def test_staleness_is_judged_by_the_storages_clock_not_the_writers(place):
    storage, where = place
    # A live holder whose clock is 3 minutes behind (its heartbeat field is old): its lease was written just now.
    foreign(storage, where, host="other-host", heartbeat=time.time() - 180)
    with pytest.raises(LeaseHeld, match="another batch run"):
        Lease(storage, where, log=lambda _: None).acquire()
    # A dead holder whose clock was a day ahead: stale once the object itself is older than stale_after.
    foreign(storage, where, host="other-host", heartbeat=1e308)
    time.sleep(2.2)  # S3 stamps objects to the second
    logs = []
    Lease(storage, where, stale_after=1.0, log=logs.append).acquire().release()
    assert any("took over a stale lease" in line for line in logs)


def test_a_pid_in_another_namespace_or_boot_is_not_judged_from_here(tmp_path):
    storage, where = Storage(), str(tmp_path / "_lease.json")
    gone_pid = 2 ** 22 + 3
    # A container with this hostname: its pid means nothing here, only its heartbeat counts.
    foreign(storage, where, pid=gone_pid, pid_ns="pid:[4026530000]", heartbeat="not a number")
    with pytest.raises(LeaseHeld):
        Lease(storage, where, log=lambda _: None).acquire()
    foreign(storage, where, pid=gone_pid, boot=1.0)  # this host before a reboot: the same
    with pytest.raises(LeaseHeld):
        Lease(storage, where, log=lambda _: None).acquire()
    foreign(storage, where, pid=gone_pid)  # this host, boot and namespace: the pid is known gone
    logs = []
    Lease(storage, where, log=logs.append).acquire().release()
    assert any("its process is gone" in line for line in logs)


def test_a_malformed_lease_is_stale_with_a_log_line(tmp_path):
    storage, where = Storage(), str(tmp_path / "_lease.json")
    for junk in (b"{not json", b"[1, 2]", b"{}"):
        storage.write_bytes(where, junk)
        logs = []
        Lease(storage, where, log=logs.append).acquire().release()
        assert any("is unreadable (not a lease record): treated as stale" in line for line in logs), logs


def test_a_run_that_loses_its_lease_stops_with_one_line(tmp_path):
    where = str(tmp_path / "_lease.json")
    # The run writes a file per 0.1 s under its lease; another run takes the lease over meanwhile.
    code = ("import sys, time, pathlib; from captioning.lease import Lease; from captioning.storage import Storage; "
            "from jobs.options import guarded\n"
            "def work():\n"
            f"    with Lease(Storage(), {where!r}, heartbeat=0.2, log=print):\n"
            "        print('held', flush=True)\n"
            f"        for i in range(600): pathlib.Path({str(tmp_path)!r}, f'part-{{i}}').write_text('x'); "
            "time.sleep(0.1)\n"
            "    return 0\n"
            "sys.exit(guarded(work))")
    # Started as a job started with `&` is: SIGINT ignored (so no KeyboardInterrupt can stop it).
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert run.stdout.readline().strip() == "held"
    storage = Storage()
    while True:  # taken over by another run, as a real taker does it: a conditional replace (the holder beats)
        data, tag = storage.read_tagged(where)
        if storage.replace_if(where, json.dumps({**json.loads(data), "id": "taker", "pid": 1}).encode(), tag):
            break
    out, err = run.communicate(timeout=30)
    assert run.returncode == 2, (out, err)
    assert err.strip().splitlines()[-1].startswith(f"error: {where}: another run took over this output's lease")
    written = len(list(tmp_path.glob("part-*")))
    time.sleep(0.5)
    assert len(list(tmp_path.glob("part-*"))) == written < 100  # it stopped writing at once
