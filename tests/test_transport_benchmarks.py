"""The transport's benchmarks: the syscall count's reading of strace's table and of the run, and the serving
side's measure without sockets."""

from __future__ import annotations

import os

from benchmarks.server_cpu import measure
from benchmarks.syscalls import answered_allocates, parse_summary, serve_child

STRACE_TABLE = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ------------------
 90.37    0.760472        3335       228        27 futex
  4.10    0.034542           2     15450           write
  1.49    0.012563           2      5850         1 epoll_pwait
------ ----------- ----------- --------- --------- ------------------
100.00    0.841432          25     21528       229 total
"""


def test_parse_summary_reads_each_calls_count() -> None:
    """Each row's calls column is read under its syscall name, with or without errors; the total row is not."""
    assert parse_summary(STRACE_TABLE) == {"futex": 228, "write": 15450, "epoll_pwait": 5850}


def test_answered_allocates_counts_the_plugins_measures_and_their_warmups() -> None:
    """The plugin's Allocate measures count, each with its warm-up calls; floors and other RPCs do not."""
    results = {
        "latency": {
            "Allocate": {"count": 2000},
            "Allocate (Go client)": {"count": 2000},
            "floor-grpclib Allocate": {"count": 2000},
            "GetPreferredAllocation": {"count": 500},
        }
    }
    assert answered_allocates(results, 2000) == 2 * (2000 + 200)
    assert answered_allocates(results, 500) == 2 * (2000 + 50)


def test_serve_child_finds_no_serve_process_under_this_one() -> None:
    """A process without a serve child has none found."""
    assert serve_child(os.getpid()) is None


async def test_server_cpu_answers_every_request() -> None:
    """Fed grpc-go-like Allocate requests, the server answers every one: alone, frame by frame (3 writes); 16
    together, the 15 after the first in one shared write."""
    alone = await measure(160, None)
    assert alone["writes_per_call"] == 3.0
    assert alone["bytes_per_call"] > 100
    assert alone["cpu_us_per_call"] > 0
    together = await measure(160, None, batch=16)
    assert together["writes_per_call"] == 4 / 16
    assert together["bytes_per_call"] == alone["bytes_per_call"]


async def test_server_cpu_answers_get_preferred_allocation() -> None:
    """Fed GetPreferredAllocation requests instead, the server answers every one with the same three frames."""
    figures = await measure(160, None, rpc="preferred")
    assert figures["writes_per_call"] == 3.0
    assert figures["cpu_us_per_call"] > 0
