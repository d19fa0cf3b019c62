"""The naive way vs cloudexec on the AWS Batch emulator: Batch API calls and time, same run.

The naive way is what a first script does with boto3: one ``SubmitJob`` per
item (each job puts its result to S3 with boto3), then rounds of one
``DescribeJobs`` per job still running, a pause between rounds, until every
job ended, then one GET per result. cloudexec runs the same items as
``ex.map`` (one array job, one bulk ``DescribeJobs`` per poll, results from
S3) with the same pause between polls. Both run on one emulator, one after
the other; the emulator counts every Batch call it receives. AWS allows about
50 Batch calls per second per account, DescribeJobs included: the naive loop's
calls per second are what throttles everyone else in the account.

Prints a table and writes ``benchmarks/results/bench_naive_aws.json``.

    python benchmarks/bench_naive_aws.py [--items 40] [--pause 1.0]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from cloudexec.testing import aws_batch_emulator

from _common import write_report


def plus_one(x: int) -> int:
    return x + 1


# What each naive job runs: the item's result put to S3 with boto3 (the job's
# environment points boto3 at the emulator), as a hand-written script would do
# to get results back at all.
_NAIVE_JOB = (
    "import boto3; boto3.client('s3').put_object(Bucket={bucket!r}, Key='naive/{x}', Body=str({x} + 1).encode())"
)


def naive(emu: Any, items: int, pause_s: float) -> tuple[float, dict[str, int]]:
    """One SubmitJob per item, one DescribeJobs per running job per round, one GET per result."""
    batch, s3 = emu.client("batch"), emu.client("s3")
    bucket = emu.io_url[len("s3://") :].split("/", 1)[0]
    emu.reset_api_calls()
    start = time.perf_counter()
    running = []
    for x in range(items):
        job = batch.submit_job(
            jobName=f"naive-{x}",
            jobQueue=emu.job_queue,
            jobDefinition=emu.job_definition,
            containerOverrides={"command": ["python", "-c", _NAIVE_JOB.format(bucket=bucket, x=x)]},
        )
        running.append(job["jobId"])
    while running:
        time.sleep(pause_s)
        still = []
        for job_id in running:
            status = batch.describe_jobs(jobs=[job_id])["jobs"][0]["status"]
            if status not in ("SUCCEEDED", "FAILED"):
                still.append(job_id)
        running = still
    out = [int(s3.get_object(Bucket=bucket, Key=f"naive/{x}")["Body"].read()) for x in range(items)]
    elapsed = time.perf_counter() - start
    assert out == [x + 1 for x in range(items)]
    return elapsed, dict(emu.api_calls)


def with_cloudexec(emu: Any, items: int, pause_s: float) -> tuple[float, dict[str, int]]:
    with emu.executor(poll_interval_s=(pause_s, pause_s)) as ex:
        emu.reset_api_calls()
        start = time.perf_counter()
        out = list(ex.map(plus_one, range(items)))
        elapsed = time.perf_counter() - start
        calls = dict(emu.api_calls)
    assert out == [x + 1 for x in range(items)]
    return elapsed, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between status rounds / polls")
    args = parser.parse_args()
    with aws_batch_emulator(timeout_scale=0.02) as emu:
        naive_s, naive_calls = naive(emu, args.items, args.pause)
        ours_s, our_calls = with_cloudexec(emu, args.items, args.pause)
    rows = []
    for name, seconds, calls in (("boto3 loop", naive_s, naive_calls), ("cloudexec map", ours_s, our_calls)):
        rows.append(
            {
                "way": name,
                "seconds": round(seconds, 3),
                "SubmitJob": calls.get("SubmitJob", 0),
                "DescribeJobs": calls.get("DescribeJobs", 0),
                "batch_calls": sum(calls.values()),
                "calls_per_s": round(sum(calls.values()) / seconds, 2),
            }
        )
    print(f"{args.items} trivial calls on the AWS Batch emulator, {args.pause:g} s between status rounds")
    print(f"  {'way':<14} {'seconds':>8} {'SubmitJob':>9} {'DescribeJobs':>12} {'all calls':>9} {'calls/s':>8}")
    for row in rows:
        print(
            f"  {row['way']:<14} {row['seconds']:8.2f} {row['SubmitJob']:9d} {row['DescribeJobs']:12d} "
            f"{row['batch_calls']:9d} {row['calls_per_s']:8.2f}"
        )
    ratio_calls = rows[0]["batch_calls"] / max(1, rows[1]["batch_calls"])
    ratio_time = ours_s / naive_s
    print(f"  calls: boto3 loop / cloudexec = {ratio_calls:.1f}x;  time: cloudexec / boto3 loop = {ratio_time:.2f}x")
    report = {
        "benchmark": "naive boto3 loop vs cloudexec map, AWS Batch emulator",
        "items": args.items,
        "pause_s": args.pause,
        "rows": rows,
        "calls_ratio_naive_over_cloudexec": round(ratio_calls, 2),
        "time_ratio_cloudexec_over_naive": round(ratio_time, 3),
    }
    write_report("bench_naive_aws", report)


if __name__ == "__main__":
    main()
