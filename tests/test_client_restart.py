"""Client restart: a real client process is SIGKILLed in the middle of a map; a new
process re-attaches by job id and receives every result, on every provider.

The emulators run in this (test) process, so they outlive the client; the client
and the re-attaching process get their endpoints as JSON on the command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.realistic

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
N_ITEMS = 8
NAP_S = 1.0

# Both processes build the same executor from the same JSON description.
_BUILD = '''
import json, sys
sys.path.insert(0, TESTS_DIR)
cfg = json.loads(sys.argv[1])
kind = cfg["provider"]
fast = (0.05, 0.3)
if kind == "local":
    from cloudexec import LocalBatchExecutor
    # Every child starts at once: children the dead client had not started never
    # run (see LocalBatchExecutor's docstring); started ones finish and are attachable.
    ex = LocalBatchExecutor(io_root=cfg["io_root"], max_workers=4, max_vcpus=N_ITEMS, poll_interval_s=fast)
elif kind == "aws":
    import boto3
    from cloudexec import AWSBatchExecutor
    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                            region_name=cfg["region"])
    ex = AWSBatchExecutor(cfg["job_queue"], cfg["job_definition"], cfg["io_url"], session=session,
                          endpoint_url=cfg["endpoint_url"], poll_interval_s=fast)
else:
    from azure.core.credentials import AzureNamedKeyCredential
    from cloudexec import AzureBatchExecutor
    ex = AzureBatchExecutor(cfg["pool_id"], storage=cfg["storage"], batch_url=cfg["batch_url"],
                            credential=AzureNamedKeyCredential(cfg["account_name"], cfg["account_key"]),
                            storage_options={"connection_string": cfg["connection_string"]},
                            poll_interval_s=fast, lro_polling_interval_s=0.1)
'''

_CLIENT = _BUILD + '''
import time
import jobs
arr = ex.submit_map(jobs.slow_double, range(N_ITEMS), [NAP_S] * N_ITEMS)
print(arr.job_id, flush=True)
for value in arr.children[0:1]:
    value.result(timeout=120)  # the map is under way: the first result is in
print("first", flush=True)
time.sleep(600)  # SIGKILLed here, in the middle of the map
'''

_ATTACHER = _BUILD + '''
job_id = sys.argv[2]
with ex:
    print(json.dumps(ex.attach(job_id).result(timeout=150)), flush=True)
'''


def _script(body: str) -> str:
    return f"TESTS_DIR = {TESTS_DIR!r}\nN_ITEMS = {N_ITEMS}\nNAP_S = {NAP_S}\n" + body


@contextlib.contextmanager
def _provider(kind: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    if kind == "local":
        yield {"provider": "local", "io_root": str(tmp_path / "io")}
    elif kind == "aws":
        from cloudexec.testing import aws_batch_emulator

        with aws_batch_emulator(timeout_scale=0.02, inherit_sys_path=False) as emu:
            yield {
                "provider": "aws",
                "region": emu.region,
                "job_queue": emu.job_queue,
                "job_definition": emu.job_definition,
                "io_url": emu.io_url,
                "endpoint_url": emu.endpoint_url,
            }
    else:
        pytest.importorskip("azure.batch")
        from cloudexec.testing import azure_batch_emulator

        with azure_batch_emulator(slots=4, kill_grace_s=1.0) as emu:
            yield {
                "provider": "azure",
                "pool_id": emu.pool_id,
                "storage": emu.storage_url,
                "batch_url": emu.batch_url,
                "account_name": emu.account_name,
                "account_key": emu.account_key,
                "connection_string": emu.blob_connection_string,
            }


def _kill_client_then_attach(
    kind: str, tmp_path: Path, client_body: str, ready: str, attacher_body: str = _ATTACHER
) -> tuple[Any, float]:
    """Run ``client_body`` in a client process, SIGKILL it once it printed ``ready``
    (after its job id), and attach to that job from a new process.

    Returns:
        The attached job's result (JSON) and when the client was killed.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(TESTS_DIR), *sys.path])}
    with _provider(kind, tmp_path) as cfg:
        config = json.dumps(cfg)
        client = subprocess.Popen(
            [sys.executable, "-c", _script(client_body), config], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert client.stdout is not None
            job_id = client.stdout.readline().strip()
            assert job_id, "the client printed no job id"
            assert client.stdout.readline().strip() == ready
            client.send_signal(signal.SIGKILL)
            client.wait(10)
            killed_at = time.monotonic()
        finally:
            if client.poll() is None:
                client.kill()
        attacher = subprocess.run(
            [sys.executable, "-c", _script(attacher_body), config, job_id],
            env=env, capture_output=True, text=True, timeout=200,
        )
        assert attacher.returncode == 0, attacher.stderr[-3000:]
        return json.loads(attacher.stdout.strip().splitlines()[-1]), killed_at


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "kind",
    [
        "local",
        "aws",
        "azure",
    ],
)
def test_sigkilled_client_then_a_new_process_attaches_and_gets_every_result(kind: str, tmp_path: Path) -> None:
    results, killed_at = _kill_client_then_attach(kind, tmp_path, _CLIENT, "first")
    print(f"\n{kind}: client SIGKILLed mid-map; re-attached by job id, {len(results)}/{N_ITEMS} results "
          f"{time.monotonic() - killed_at:.1f} s later, lost {N_ITEMS - len(results)}")
    assert results == [2 * i for i in range(N_ITEMS)]


_CHAIN_CLIENT = _BUILD + '''
import time
import jobs
a = ex.submit(jobs.slow_double, 1, NAP_S)
b = ex.submit(jobs.double, a)
c = ex.submit(jobs.total, [a, b, 10])
print(c.job_id, flush=True)
while c.job_status is None:  # handed to the service, which holds it for b (and b for a)
    time.sleep(0.05)
print("handed", flush=True)
time.sleep(600)  # SIGKILLed here, before the chain ended
'''


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "kind",
    [
        "local",
        "aws",
        "azure",
    ],
)
def test_depend_chain_survives_its_sigkilled_client(kind: str, tmp_path: Path) -> None:
    """A three-step chain is handed over whole; the service runs it after its client died."""
    result, _ = _kill_client_then_attach(kind, tmp_path, _CHAIN_CLIENT, "handed")
    assert result == 2 + 4 + 10


_FAILING_CHAIN_CLIENT = _BUILD + '''
import os, time
import jobs
a = ex.submit(jobs.flaky_after, os.path.join(cfg["io_root"], "count"), 1, NAP_S)  # its one attempt fails
b = ex.submit(jobs.double, a)
c = ex.submit(jobs.total, [b, 10])
print(c.job_id, flush=True)
while c.job_status is None:
    time.sleep(0.05)
print("handed", flush=True)
time.sleep(600)  # SIGKILLed here, while a still runs
'''

_ERROR_ATTACHER = _BUILD + '''
job_id = sys.argv[2]
with ex:
    print(json.dumps(str(ex.attach(job_id).exception(timeout=150))), flush=True)
'''


def _keepers(io_root: str) -> list[Any]:
    """The local keeper processes of executors on ``io_root``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if any("_local_keeper" in part for part in cmdline) and os.path.abspath(io_root) in cmdline:
            found.append(proc)
    return found


def _no_keeper_left(io_root: str, within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while _keepers(io_root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _keepers(io_root), "a keeper process outlived the jobs it adopted"


@pytest.mark.timeout(120)
def test_local_keeper_fails_adopted_dependents_of_a_failed_upstream_then_exits(tmp_path: Path) -> None:
    """The client dies while the upstream job runs; it fails; the keeper fails its held dependents."""
    error, _ = _kill_client_then_attach("local", tmp_path, _FAILING_CHAIN_CLIENT, "handed", _ERROR_ATTACHER)
    # c waited for b, b for a: each names the job it waited for, and a's failure is at the end.
    assert error.count("Dependency") >= 2 and "non-zero exit code" in error, error
    _no_keeper_left(str(tmp_path / "io"))


@pytest.mark.timeout(120)
def test_local_keeper_adopts_nothing_after_an_orderly_shutdown(tmp_path: Path) -> None:
    import jobs
    from cloudexec import LocalBatchExecutor

    io_root = str(tmp_path / "io")
    with LocalBatchExecutor(io_root=io_root, max_workers=2) as ex:
        up = ex.submit(jobs.slow_double, 1, 0.5)
        down = ex.submit(jobs.double, up)
        while down.job_status is None:  # handed to the local scheduler, which holds it for up
            time.sleep(0.01)
        assert _keepers(io_root), "a held job on a persistent io_root has a keeper"
        assert down.result(timeout=60) == 4
    _no_keeper_left(io_root)
