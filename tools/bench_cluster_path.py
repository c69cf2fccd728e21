"""What one MoE layer's round trip to two devices costs through each data path Ray offers.

Starts a local Ray cluster (a head and two worker nodes offering the `edgemoe` resource,
separate processes on this machine), puts one echo actor on each worker node, and times
sending hidden-state rows to both at once and getting same-sized outputs back (a layer's
two experts on two devices), through:

  (a) actor method calls: .remote() to both, ray.wait for both, ray.get; also a layer's
      call with its expert table, as four NumPy arguments and as the one bytes object the
      runtime sends (edgemoe.cluster.server.pack_call);
  (b) a Ray Compiled Graph (ray.dag, experimental_compile) over the two actors;
  (c) Ray's shared-memory channels used directly: the driver writes each device's rows into
      a channel its actor reads in a loop, the actor writes its output into a channel the
      driver reads;
  (d) a channel the actors set up themselves through Ray (edgemoe.cluster.channel, what the
      runtime uses by default): each actor listens on a TCP socket on its node's address and
      returns host:port from an ordinary Ray call; the driver then sends each layer's packed
      call as one length-prefixed frame on a persistent connection (TCP_NODELAY) and reads
      the answer.

Each path also runs with no payload (the per-call overhead). Prints median and p90
microseconds per round trip and the driver's CPU time per round trip (what the coordinator
spends, which on a machine of few cores is taken from everything else); docs/cluster.md
records a run.

    python tools/bench_cluster_path.py [--calls 400] [--hidden 1024] [--rows 1 16]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from edgemoe.cluster.channel import PING, Channel, Listener, receive
from edgemoe.cluster.server import pack_call, unpack_call


@ray.remote(num_cpus=0)
class Echo:
    """Stands for a device: returns an array shaped like its input (an expert's output rows)."""

    def rows(self, x: np.ndarray | None) -> np.ndarray | None:
        return None if x is None else x + 0.0  # a new array, as an expert's output is

    def four(self, layer: int, x: np.ndarray, experts: np.ndarray, counts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return x[rows] + 0.0  # a layer's call as four arrays, as the runtime sent it before

    def packed(self, call: bytes) -> bytes:
        _, x, _, _, rows = unpack_call(call)  # a layer's call as the runtime sends it
        return (x[rows] + 0.0).tobytes()

    failure: str | None = None  # why (c)'s loop stopped, if it did

    def open_channel(self, host: str) -> tuple[str, int]:
        """(d): listen on this node's address; every frame is answered as `packed` answers."""
        self.listener = Listener(host, self.packed)
        return self.listener.address

    def why(self) -> str | None:
        return self.failure

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def serve(self, inbox: Any, reader: Any, reader_node: str, size: int) -> Any:
        """(c): a channel this actor writes and `reader` reads (its writer must make it); then
        answers every value read from inbox into it, on a thread, until inbox closes."""
        from ray.experimental.channel import Channel

        outbox = Channel(ray.get_runtime_context().current_actor, [(reader, reader_node)], size)

        def loop() -> None:
            inbox.ensure_registered_as_reader()
            outbox.ensure_registered_as_writer()
            while True:
                try:
                    x = inbox.read()
                    x = None if x is None else np.array(x)  # a read array views the channel's buffer
                except Exception:  # the channel was closed: the benchmark is over
                    return
                try:
                    outbox.write(self.rows(x))
                except Exception as e:
                    self.failure = f"{type(e).__name__}: {e}"
                    return

        threading.Thread(target=loop, daemon=True).start()
        return outbox


@ray.remote(num_cpus=0)
class Driver:
    """Stands in for the driver as the reader of the actors' output channels (a channel's
    readers are actors); the driver reads them through the buffer on its own node."""

    def ping(self) -> None:
        return None


def timed(fn: Callable[[], Any], calls: int) -> tuple[float, float, float]:
    """(median, p90) microseconds of fn() over `calls` calls after 20 warm-up calls, and this
    process's CPU microseconds per call."""
    for _ in range(20):
        fn()
    ts = []
    cpu0 = time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / calls
    ts.sort()
    return 1e6 * statistics.median(ts), 1e6 * ts[int(0.9 * (len(ts) - 1))], 1e6 * cpu


def actor_calls(actors: list[Any], payload: np.ndarray | None) -> Callable[[], Any]:
    def call() -> Any:
        refs = [a.rows.remote(payload) for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
        assert len(ready) == len(refs)
        return ray.get(refs)

    return call


def layer_calls(actors: list[Any], x: np.ndarray, packed: bool) -> Callable[[], Any]:
    """A layer's call with its expert table (two experts, each taking every row): four
    NumPy arguments, or the one bytes object of pack_call."""
    experts, counts = np.array([3, 5], np.int32), np.array([len(x), len(x)], np.int32)
    rows = np.concatenate([np.arange(len(x)), np.arange(len(x))]).astype(np.int32)

    def call() -> Any:
        if packed:
            refs = [a.packed.remote(pack_call(7, x, experts, counts, rows)) for a in actors]
        else:
            refs = [a.four.remote(7, x, experts, counts, rows) for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
        assert len(ready) == len(refs)
        return ray.get(refs)

    return call


def socket_calls(channels: list[Channel], x: np.ndarray | None) -> Callable[[], Any]:
    """(d): the same layer's call as layer_calls, packed, over each actor's own TCP channel
    (no payload: an empty frame, answered empty)."""
    experts, counts = np.array([3, 5], np.int32), np.array([0, 0], np.int32)
    rows = np.zeros(0, np.int32)
    if x is not None:
        counts = np.array([len(x), len(x)], np.int32)
        rows = np.concatenate([np.arange(len(x)), np.arange(len(x))]).astype(np.int32)

    def round_trip() -> Any:
        end = time.monotonic() + 10
        for c in channels:
            if x is None:
                c.send(b"", end, PING)
            else:
                c.send(pack_call(7, x, experts, counts, rows), end)  # packed per call, as the runtime does
        answers = receive(channels, end)
        assert all(isinstance(a, bytes) for a in answers), answers
        return answers

    return round_trip


def compiled_graph(actors: list[Any]) -> Any:
    from ray.dag import InputNode, MultiOutputNode

    with InputNode() as inp:
        dag = MultiOutputNode([a.rows.bind(inp[i]) for i, a in enumerate(actors)])
    return dag.experimental_compile()


def channels(actors: list[Any], nodes: list[str], head: str, size: int) -> tuple[list[Any], list[Any], Any]:
    from ray.experimental.channel import Channel

    driver = Driver.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    ray.get(driver.ping.remote())
    inboxes = [Channel(None, [(a, n)], size) for a, n in zip(actors, nodes)]
    outboxes = ray.get([a.serve.remote(i, driver, head, size) for a, i in zip(actors, inboxes)])
    for c in inboxes:
        c.ensure_registered_as_writer()
    for c in outboxes:
        c.ensure_registered_as_reader()
    return inboxes, outboxes, driver


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    ap.add_argument("--calls", type=int, default=400, help="timed round trips per row (default 400)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"edgemoe": 1})
        ray.init(address=cluster.address, logging_level="warning")
        head = ray.get_runtime_context().get_node_id()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("edgemoe")]
        actors = [
            Echo.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes
        ]
        assert ray.get([a.node.remote() for a in actors]) == nodes

        payloads: list[tuple[str, np.ndarray | None]] = [("no payload", None)]
        payloads += [(f"{r} rows x {args.hidden}", np.ones((r, args.hidden), np.float32)) for r in args.rows]
        results: list[tuple[str, str, str]] = []

        def record(path: str, what: str, fn: Callable[[], Any]) -> None:
            med, p90, cpu = timed(fn, args.calls)
            results.append((path, what, f"{med:8.0f} {p90:8.0f} {cpu:8.0f}"))
            print(
                f"{path:<30} {what:<20} median {med:8.0f} us  p90 {p90:8.0f} us  driver CPU {cpu:8.0f} us", flush=True
            )

        addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        where = ray.get([a.open_channel.remote(addresses[n]) for a, n in zip(actors, nodes)])
        sockets = [Channel(host, port, 10.0) for host, port in where]
        for what, x in payloads:
            record("(d) the actors' TCP channels", what, socket_calls(sockets, x))

        for what, x in payloads:
            record("(a) actor calls", what, actor_calls(actors, x))
        for what, x in payloads[1:]:
            assert x is not None
            record("(a) a layer's call, 4 arrays", what, layer_calls(actors, x, packed=False))
            record("(a) a layer's call, packed", what, layer_calls(actors, x, packed=True))

        try:
            graph = compiled_graph(actors)
            try:
                for what, x in payloads:
                    record("(b) compiled graph", what, lambda: ray.get(graph.execute(*[x] * len(actors)), timeout=10))
            finally:
                graph.teardown()
        except Exception as e:  # recorded, not fatal: the other paths still measure
            results.append(("(b) compiled graph", "error", f"{type(e).__name__}: {e}"))
            print(f"(b) compiled graph: {type(e).__name__}: {e}", flush=True)

        try:
            size = 4 * max(args.rows) * args.hidden + 4096
            inboxes, outboxes, driver = channels(actors, nodes, head, size)

            def through_channels(x: np.ndarray | None) -> Callable[[], Any]:
                def call() -> Any:
                    for c in inboxes:
                        c.write(x, timeout=10)
                    return [np.array(c.read(timeout=10)) for c in outboxes]

                return call

            try:
                for what, x in payloads:
                    record("(c) channels", what, through_channels(x))
            finally:
                for c in inboxes + outboxes:
                    c.close()
                ray.kill(driver)
        except Exception as e:
            why = [w for w in ray.get([a.why.remote() for a in actors], timeout=10) if w]
            e = RuntimeError(why[0]) if why else e  # the actor's side of the failure, if it saw one
            results.append(("(c) channels", "error", f"{type(e).__name__}: {e}"))
            print(f"(c) channels: {type(e).__name__}: {e}", flush=True)

        print("\n| path | payload | median us | p90 us | driver CPU us |\n| --- | --- | ---: | ---: | ---: |")
        for path, what, numbers in results:
            cells = numbers.split() if what != "error" else [numbers, "", ""]
            print(f"| {path} | {what} | {' | '.join(cells)} |")
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
