"""What the cost model needs to know about a machine, measured once and kept as JSON.

A `Calibration` holds compute rates (flops/s per op family and dtype, memory bytes/s, the
Python cost of one node) and Ray's costs (object-store bytes/s, per-task overhead,
task-to-task latency). Its defaults are the planner's constants (engine/planner.py);
`graphgrad calibrate` measures this machine (`measure`) and writes calibration.json into
the data directory, which the server loads at start (`load_or_defaults`: a corrupt file
is a warning and the defaults, never a failed start).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from graphgrad.engine import proc_cpu
from graphgrad.engine.allocator import TUNED_MMAP_BYTES, tune_for_speed
from graphgrad.engine.loops import VIEWS, family
from graphgrad.engine.ops import Op
from graphgrad.engine.planner import (
    BYTES_PER_S,
    FLOPS_PER_S,
    NODE_OVERHEAD_S,
    STAGE_BYTES_PER_S,
    TASK_OVERHEAD_S,
)

VERSION = 1
FILE_NAME = "calibration.json"
# Scheduling latency between a task's end and the start of a task waiting on it; the planner
# has no constant for it (it folds it into TASK_OVERHEAD_S); `graphgrad calibrate` measures it.
TASK_LATENCY_S = 5e-4
REQUEST_OVERHEAD_S = 2e-5
PUT_OVERHEAD_S = 1e-3  # "each ray.put costs about a millisecond" (engine/ray_executor.py)
SUBMIT_S = 2e-4
LOOP_S, REDUCE_LOOP_S, MATRIX_S = 7e-9, 3e-8, 1.5e-7  # engine/loops.py's counts cost these
CACHE_BYTES = 1 << 21  # a node touching no more than this runs from cache
FRESH_BYTES = TUNED_MMAP_BYTES  # a result this large gets fresh pages (its own mmap)
LAST_CACHE_BYTES = 32 << 20  # a program whose values outgrow this streams them from memory
FAMILIES = ("elementwise", "linalg", "reduce")  # measured; other families use the default
# Ops whose arithmetic costs far more than their family's (keyed "op/dtype" in flops_per_s).
TRANSCENDENTAL = {"tanh": np.tanh, "exp": np.exp, "log": np.log, "sin": np.sin, "cos": np.cos}
DTYPES = ("float64", "float32")
# Ray returns a task's results up to this size in its reply (max_direct_call_object_size);
# larger ones go through the object store. The probe's export is well past it.
INLINE_BYTES = 100 << 10
STORE_OBJECT_PROBE_BYTES = 256 << 10

if TYPE_CHECKING:  # the executor probe's request and schedule (imported where they run)
    from graphgrad.engine.autodiff import RunRequest
    from graphgrad.engine.driver import Schedule
    from graphgrad.engine.ir import Graph

log = logging.getLogger("graphgrad.calibration")


class CalibrationError(ValueError):
    """A calibration file that cannot be used: it names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class Calibration:
    """Rates and costs of one machine (and its Ray); `source` says where they come from."""

    source: str = "defaults"
    node_overhead_s: float = NODE_OVERHEAD_S  # Python dispatch per node
    # What a small matmul's and a small reduction's dispatch costs beyond an elementwise
    # node's (numpy's matmul and reductions take several times an add's setup).
    linalg_dispatch_s: float = 0.0
    reduce_dispatch_s: float = 0.0
    request_overhead_s: float = REQUEST_OVERHEAD_S  # per run: feeds checked, results named
    bytes_per_s: float = BYTES_PER_S  # memory traffic of elementwise numpy (heap reused)
    # The same into fresh pages: a result of FRESH_BYTES or more gets an mmap of its own
    # (engine/allocator.py's threshold) and page-faults every page in.
    fresh_bytes_per_s: float = BYTES_PER_S
    cache_bytes_per_s: float = BYTES_PER_S  # the same, for nodes touching <= CACHE_BYTES
    default_flops_per_s: float = FLOPS_PER_S  # families and dtypes not measured
    # "family/dtype" -> flops/s (e.g. "linalg/float64"); missing keys use the default.
    flops_per_s: Mapping[str, float] = field(default_factory=dict)
    loop_s: float = LOOP_S  # one more inner loop of an elementwise op (a broadcast)
    reduce_loop_s: float = REDUCE_LOOP_S  # one more inner loop of a reduction
    matrix_s: float = MATRIX_S  # one more matrix of a stacked matmul
    last_cache_bytes: float = LAST_CACHE_BYTES  # the last-level cache
    store_bytes_per_s: float = STAGE_BYTES_PER_S  # ray.put / ray.get through the object store
    put_overhead_s: float = PUT_OVERHEAD_S  # one ray.put of a small object, at the caller
    submit_s: float = SUBMIT_S  # the caller's cost of submitting one task
    task_overhead_s: float = TASK_OVERHEAD_S  # CPU time one Ray task costs beyond its work
    task_latency_s: float = TASK_LATENCY_S  # a dependency's end to its consumer's start
    # A task's work on a busy Ray takes this many times one dedicated CPU's (its CPUs
    # shared with Ray's own processes and whatever else the machine runs).
    task_slowdown: float = 1.0
    # What Ray's own processes spend per task: the driver (submitting, waiting, getting) and
    # Ray's daemons (raylet, GCS). On a node whose Ray CPUs are all its cores (`cores`: the
    # calibrated machine's; 0, unknown: the driver and daemons are taken to have cores of
    # their own) it comes out of the workers' CPUs, and the simulator charges it per task.
    driver_task_s: float = 0.0
    daemon_task_s: float = 0.0
    cores: float = 0.0
    # A task's exports too large for its reply (over INLINE_BYTES) go through the object
    # store as an object: what that costs beyond the bytes (created, sealed, pinned, located).
    store_object_s: float = 0.0
    # A task waiting on such an export waits this much longer than on one in a reply.
    store_wait_s: float = 0.0
    ray_measured: bool = False  # False: the Ray figures are the defaults

    def flops_rate(self, family: str, dtype: str, op: str = "") -> float:
        """The op's own rate if measured, else its family's, else the default."""
        rates = self.flops_per_s
        rate = rates.get(f"{op}/{dtype}") if op else None
        return rate or rates.get(f"{family}/{dtype}", self.default_flops_per_s)

    def node_seconds(
        self,
        op: Op,
        dtype: str,
        flops: float,
        nbytes: float,
        loops: int = 0,
        streaming: bool = False,
        out_bytes: float = 0,
    ) -> float:
        """A node's estimated time: dispatch, numpy's inner loops (engine/loops.py),
        arithmetic at its op's rate, memory traffic: from cache for a node touching little,
        unless its program is `streaming` (its values outgrow the last-level cache, so
        they come from memory); into fresh pages for a result (`out_bytes`) that gets an
        mmap of its own."""
        if op.name in VIEWS:
            return self.node_overhead_s
        kind = family(op)
        rate = self.flops_rate(kind, dtype, op.name)
        cached = nbytes <= CACHE_BYTES and not streaming
        if out_bytes >= FRESH_BYTES:
            bw = self.fresh_bytes_per_s
        else:
            bw = self.cache_bytes_per_s if cached else self.bytes_per_s
        dispatch = self.node_overhead_s
        if kind == "linalg":
            dispatch, per_loop = dispatch + self.linalg_dispatch_s, self.matrix_s
        elif kind == "reduce":
            dispatch, per_loop = dispatch + self.reduce_dispatch_s, self.reduce_loop_s
        else:
            per_loop = self.loop_s
        return dispatch + loops * per_loop + flops / rate + nbytes / bw

    def to_json(self) -> str:
        body = {"version": VERSION, **dataclasses.asdict(self)}
        body["flops_per_s"] = dict(self.flops_per_s)
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "calibration") -> Calibration:
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{where}: not JSON ({e})") from e
        if not isinstance(body, dict):
            raise CalibrationError(f"{where}: expected a JSON object, got {type(body).__name__}")
        if body.get("version") != VERSION:
            raise CalibrationError(
                f"{where}: version {body.get('version')!r} is not the supported {VERSION}"
            )
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - set(known) - {"version"})
        if unknown:
            raise CalibrationError(f"{where}: unknown field(s) {unknown}")
        values: dict[str, Any] = {}
        for name, value in body.items():
            if name == "version":
                continue
            if name == "source":
                if not isinstance(value, str):
                    raise CalibrationError(f"{where}: source must be a string, got {value!r}")
            elif name == "ray_measured":
                if not isinstance(value, bool):
                    raise CalibrationError(f"{where}: ray_measured must be true or false")
            elif name == "flops_per_s":
                if not isinstance(value, dict):
                    raise CalibrationError(f"{where}: flops_per_s must be an object")
                value = {k: _positive(where, f"flops_per_s[{k!r}]", v) for k, v in value.items()}
            else:
                value = _positive(where, name, value, allow_zero=name in MAY_BE_ZERO)
            values[name] = value
        # A file from before fresh pages were measured apart measured its memory rate into
        # fresh pages: that rate, not the default, is its fresh one.
        if "bytes_per_s" in values and "fresh_bytes_per_s" not in values:
            values["fresh_bytes_per_s"] = values["bytes_per_s"]
        return cls(**values)


MAY_BE_ZERO = frozenset(
    {
        "task_latency_s",
        "driver_task_s",
        "daemon_task_s",
        "cores",
        "store_object_s",
        "store_wait_s",
        "linalg_dispatch_s",
        "reduce_dispatch_s",
    }
)


def _positive(where: str, name: str, value: object, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]
        expected = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise CalibrationError(f"{where}: {name} must be {expected}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


DEFAULT = Calibration()
_in_force = DEFAULT  # one per process: the server sets it at start (server/cli.py)


def in_force() -> Calibration:
    """The calibration the planner and simulator use in this process."""
    return _in_force


def use(cal: Calibration) -> None:
    global _in_force
    _in_force = cal


def figures(cal: Calibration) -> dict[str, float]:
    """Its numbers by name, flops rates as "flops_per_s/FAMILY/DTYPE" (GetServerInfo)."""
    out = {
        f.name: float(getattr(cal, f.name))
        for f in dataclasses.fields(cal)
        if f.name not in ("source", "flops_per_s")
    }
    out.update({f"flops_per_s/{k}": v for k, v in cal.flops_per_s.items()})
    return out


# A calibration file is a few hundred bytes: past this it is no calibration (a device such as
# /dev/zero would otherwise be read until memory runs out).
MAX_FILE_BYTES = 1 << 20


def load(path: Path) -> Calibration:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read ({e.strerror or e})") from e
    if len(data) > MAX_FILE_BYTES:
        raise CalibrationError(f"{path}: larger than {MAX_FILE_BYTES} bytes, no calibration")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path}: not UTF-8 text ({e})") from e
    return Calibration.from_json(text, str(path))


def save(cal: Calibration, path: Path) -> None:
    """Written whole, then renamed into place: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(cal.to_json())
    tmp.replace(path)


def default_data_dir() -> Path:
    """$GRAPHGRAD_DATA_DIR (an empty variable counts as unset), else
    ~/.local/share/graphgrad: where `graphgrad serve` keeps jobs and `graphgrad calibrate`
    writes its file."""
    return Path(os.environ.get("GRAPHGRAD_DATA_DIR") or Path.home() / ".local/share/graphgrad")


def load_for_client(path: str | Path | None = None) -> Calibration:
    """What an in-process client uses: the file at `path` when one is given (unusable: a
    CalibrationError naming it), else the default data directory's (absent: the defaults;
    unusable: a warning and the defaults), as a server started there would."""
    if path is not None:
        return load(Path(path))
    return load_or_defaults(default_data_dir())


def load_or_defaults(data_dir: Path) -> Calibration:
    """The calibration in data_dir, or the defaults: absent silently, unusable with a warning."""
    path = data_dir / FILE_NAME
    if not path.exists():
        return DEFAULT
    try:
        return load(path)
    except CalibrationError as e:
        log.warning("%s; using the default calibration", e)
        return DEFAULT


# --- measuring -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timer:
    """Seconds per call of a probe: the median of `repeats` samples, each as many calls as
    fill `sample_s`. `clock`: the process's CPU time (what a dedicated CPU would take, the
    same on a shared machine whatever else runs) or the wall clock (what a run beside the
    machine's other work sees, its share of the CPU included)."""

    repeats: int = 9
    sample_s: float = 0.02
    clock: Callable[[], float] = time.process_time

    def __call__(self, fn: Callable[[], object]) -> float:
        clock = self.clock
        fn()  # warm: allocations, BLAS threads
        t0 = time.perf_counter()
        fn()
        calls = max(1, int(self.sample_s / max(time.perf_counter() - t0, 1e-7)))
        samples = []
        for _ in range(self.repeats):
            t0 = clock()
            for _ in range(calls):
                fn()
            samples.append((clock() - t0) / calls)
        return statistics.median(samples)


WALL = Timer(5, 0.02, time.perf_counter)


def measure_node_overhead(nodes: int = 2000, timer: Timer = WALL) -> float:
    """Seconds per node of a compiled program of small-vector ops (tanh, add, mul: all
    dispatch and allocation, next to no arithmetic), as most nodes of small graphs are."""
    from graphgrad.engine.autodiff import RunRequest
    from graphgrad.engine.executor import LocalExecutor
    from graphgrad.engine.ir import Graph, Node

    chain = [Node("x", "input", shape=(16,), dtype="float64")]
    for i in range(nodes):
        op = ("tanh", "add", "mul")[i % 3]
        inputs = (chain[-1].name,) if op == "tanh" else (chain[-1].name, "x")
        chain.append(Node(f"n{i}", op, inputs))
    graph = Graph(chain)
    request = RunRequest((chain[-1].name,), {"x": np.full(16, 0.5)}, ())
    executor = LocalExecutor()
    return timer(lambda: executor.run(graph, request)) / nodes


def measure_family_dispatch(
    node_overhead_s: float, nodes: int = 2000, timer: Timer = WALL
) -> tuple[float, float]:
    """Seconds a small matmul and a small reduction cost beyond an elementwise node, from
    compiled programs as measure_node_overhead's: a chain of [16, 16] @ [16] matmuls, and
    one of full sums each added back to a vector (next to no arithmetic in either)."""
    from graphgrad.engine.autodiff import RunRequest
    from graphgrad.engine.executor import LocalExecutor
    from graphgrad.engine.ir import Graph, Node

    def per_node(chain: list[Node], feeds: dict[str, np.ndarray]) -> float:
        graph = Graph(chain)
        request = RunRequest((chain[-1].name,), feeds, ())
        executor = LocalExecutor()
        return timer(lambda: executor.run(graph, request)) / (len(chain) - len(feeds))

    vector = Node("x", "input", shape=(16,), dtype="float64")
    matmuls = [vector, Node("W", "input", shape=(16, 16), dtype="float64")]
    for i in range(nodes):
        matmuls.append(Node(f"m{i}", "matmul", ("W", matmuls[-1].name)))
    feeds = {"x": np.full(16, 0.5), "W": np.full((16, 16), 1 / 16)}
    linalg = per_node(matmuls, feeds) - node_overhead_s
    sums = [vector]
    for i in range(nodes // 2):
        sums.append(Node(f"s{i}", "sum", (sums[-1].name,)))
        sums.append(Node(f"a{i}", "add", ("x", f"s{i}")))
    reduce = 2 * (per_node(sums, {"x": feeds["x"]}) - node_overhead_s)  # half are adds
    return max(linalg, 0.0), max(reduce, 0.0)


def measure_request_overhead(node_overhead_s: float, timer: Timer = WALL) -> float:
    """Seconds one request costs beyond its nodes: an engine Session's run (what the
    in-process client and the servicers wrap) of four fed vectors, their gradients asked
    for, less its nodes at `node_overhead_s` each."""
    from graphgrad.engine.autodiff import RunRequest
    from graphgrad.engine.ir import Graph, Node
    from graphgrad.engine.session import Session

    names = ("a", "b", "c", "d")
    nodes = [Node(n, "input", shape=(16,), dtype="float64") for n in names]
    nodes += [Node("ab", "mul", ("a", "b")), Node("cd", "mul", ("c", "d"))]
    nodes += [Node("s", "add", ("ab", "cd")), Node("loss", "sum", ("s",))]
    graph = Graph(nodes)
    request = RunRequest(("loss",), {n: np.full(16, 0.5) for n in names}, names)
    session = Session()
    # Its program: the 4 forward nodes and about as many gradient nodes.
    run = timer(lambda: session.run(graph, request))
    programs = session.dispatcher.local.plan(graph, request)[1].tasks
    return max(run - sum(len(t.nodes) for t in programs) * node_overhead_s, 0.0)


ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def measure_compute(quick: bool = False, cpu_clock: bool = True) -> Calibration:
    """The compute figures of one CPU of this machine (Ray's stay the defaults), measured in
    a subprocess whose BLAS has one thread: a task has one CPU (Ray gives its workers
    OMP_NUM_THREADS=1), and the inline time it predicts is one CPU's. `cpu_clock`: see Timer."""
    call = f"from {__name__} import _print_compute; _print_compute({quick}, {cpu_clock})"
    done = subprocess.run(
        [sys.executable, "-c", call],
        env={**os.environ, **ONE_THREAD},
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measuring compute failed: {done.stderr.strip()[-2000:]}")
    return Calibration.from_json(done.stdout.strip().splitlines()[-1], "measure_compute")


def _print_compute(quick: bool, cpu_clock: bool) -> None:
    cal = measure_compute_here(quick, cpu_clock)
    print(cal.to_json().replace("\n", " "))  # read by measure_compute


def measure_compute_here(quick: bool, cpu_clock: bool = True) -> Calibration:
    """measure_compute's figures, in this process (with whatever BLAS threads it has), its
    malloc tuned as Ray workers and the in-process client run (engine/allocator.py)."""
    tune_for_speed()
    clock = time.process_time if cpu_clock else time.perf_counter
    med = Timer(3, 0.01, clock) if quick else Timer(9, 0.02, clock)
    overhead = measure_node_overhead(500 if quick else 2000, med)
    linalg_dispatch, reduce_dispatch = measure_family_dispatch(
        overhead, 500 if quick else 2000, med
    )
    request = measure_request_overhead(overhead, med)
    # Out of cache: into a result that reuses heap pages (as a node's below FRESH_BYTES does,
    # malloc tuned), and into one of FRESH_BYTES, which gets fresh pages to fault in.
    big = np.ones(1 << 23)  # 64 MiB: twice the last-level cache of a typical machine
    reused = np.empty_like(big)
    memory = 3 * big.nbytes / med(lambda: np.add(big, big, out=reused))
    fresh = np.ones(FRESH_BYTES // 8)
    fresh_memory = 3 * fresh.nbytes / med(lambda: np.add(fresh, fresh))
    n = 1 << 15  # 256 KiB of float64: the size of a typical tensor, in cache as they are
    rates: dict[str, float] = {}
    bytes_per_s = BYTES_PER_S
    for dtype in DTYPES:
        a = np.abs(np.random.default_rng(0).standard_normal(n)).astype(dtype) + 0.5
        b = a[::-1].copy()
        moved = 3 * a.nbytes  # add: two reads and a write, no arithmetic to speak of
        bw = moved / med(lambda: np.add(a, b))  # noqa: B023
        if dtype == "float64":
            bytes_per_s = bw
        # What is left after the memory traffic is arithmetic (flops counted as ops do:
        # one per element for elementwise and reductions, 2 m n k for matmul).
        t = med(lambda: np.multiply(a, b))  # noqa: B023
        rates[f"elementwise/{dtype}"] = n / max(t - moved / bw, t * 0.05)
        for name, fn in TRANSCENDENTAL.items():  # each far slower than a multiply
            t = med(lambda: fn(a))  # noqa: B023
            rates[f"{name}/{dtype}"] = n / max(t - 2 * a.nbytes / bw, t * 0.05)
        t = med(lambda: a.sum())  # noqa: B023
        rates[f"reduce/{dtype}"] = n / max(t - a.nbytes / bw, t * 0.05)
        k = 64 if quick else 256  # quick: small enough for one BLAS thread
        m = np.random.default_rng(1).standard_normal((k, k)).astype(dtype)
        # The layouts a gradient multiplies in (x @ W, g @ W.T, x.T @ g), equally weighted.
        t = med(lambda: m @ m) + med(lambda: m @ m.T) + med(lambda: m.T @ m)  # noqa: B023
        rates[f"linalg/{dtype}"] = 3 * 2.0 * k**3 / t
    loop, reduce_loop, matrix = measure_loops(rates["linalg/float64"], med)
    return Calibration(
        last_cache_bytes=last_cache_bytes(),
        source=f"measured on {socket.gethostname()} at "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}" + (" (quick)" if quick else ""),
        node_overhead_s=overhead,
        linalg_dispatch_s=linalg_dispatch,
        reduce_dispatch_s=reduce_dispatch,
        request_overhead_s=request,
        bytes_per_s=memory,
        fresh_bytes_per_s=fresh_memory,
        cache_bytes_per_s=bytes_per_s,
        flops_per_s=rates,
        loop_s=loop,
        reduce_loop_s=reduce_loop,
        matrix_s=matrix,
    )


def last_cache_bytes() -> float:
    """The largest CPU cache of this machine, as Linux reports it (the default elsewhere)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    return float(max(sizes, default=LAST_CACHE_BYTES))


def measure_loops(matmul_flops_per_s: float, med: Timer) -> tuple[float, ...]:
    """Seconds of one more inner loop (engine/loops.py) of a broadcast, of a reduction over a
    middle axis and of a stacked matmul: each probe against the same elements in one loop.
    Stacked float64 [256, 64, 16], as a batch of small networks in training is."""
    x = np.full((256, 64, 16), 0.5)
    row, flat = np.full((256, 1, 16), 0.5), np.full(x.shape, 0.25)
    loops = 256 * 64  # both probes run one loop per run of 16
    one = med(lambda: np.add(x, flat))
    loop = (med(lambda: np.add(x, row)) - one) / loops
    whole = med(lambda: x.sum())
    reduce_loop = (med(lambda: x.sum(axis=1)) - whole) / loops
    m = np.full((1024, 8, 8), 0.5)
    t = med(lambda: np.matmul(m, m))
    matrix = (t - 2 * m.size * 8 / matmul_flops_per_s) / len(m)
    return max(loop, 1e-10), max(reduce_loop, 1e-10), max(matrix, 1e-10)


@dataclass(frozen=True, slots=True)
class RayFigures:
    store_bytes_per_s: float
    put_overhead_s: float
    submit_s: float
    task_overhead_s: float
    task_latency_s: float
    task_slowdown: float
    driver_task_s: float
    daemon_task_s: float
    cores: float
    store_object_s: float
    store_wait_s: float


def measure_ray(cpus: int | None = None) -> RayFigures:
    """Ray's figures, measured in the Ray this process runs (or a local one started here
    and stopped after, which costs seconds). Only `graphgrad calibrate` without --quick and
    bench/simulate.py call it."""
    import ray  # the one place besides engine/ray_executor.py: a probe, not an executor

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    try:
        return _ray_probes(ray)
    finally:
        if started:
            ray.shutdown()


def _busy(seconds: float) -> None:
    """Hold one CPU for `seconds` of this process's CPU time (a task's work)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def _ray_probes(ray: Any) -> RayFigures:
    """Probe tasks shaped like the executor's (two returns, arrays out, ObjectRefs in):
    what each costs beyond its work with every CPU busy, what a tensor costs from the task
    making it to the task reading it, a dependency's latency, a put and a submit."""

    @ray.remote(num_returns=2)
    def probe(work_s: float, nbytes: int, *upstream: Any) -> tuple[np.ndarray, int]:
        _busy(work_s)
        read = sum(float(u[:: 1 << 12].sum()) for u in upstream)  # touch every page
        return np.full(max(nbytes // 8, 1), read), 0

    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ray.get([probe.remote(0.0, 8)[1] for _ in range(4 * workers)])  # workers up

    # Every CPU busy: the wall time of many tasks per task, without work (the overhead)
    # and with known work (how much slower than one dedicated CPU a task's work runs).
    def per_task(work: float, nbytes: int = 8, tasks: int = 16 * workers) -> float:
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            made = [probe.remote(work, nbytes) for _ in range(tasks)]
            ray.get([meta for _, meta in made])
            samples.append((time.perf_counter() - t0) * workers / tasks)
            del made
        return statistics.median(samples)

    overhead = max(per_task(0.0), 1e-5)
    # An export too large to travel in the task's reply goes through the object store: what
    # that costs beyond its bytes (whose cost `store` measures below) is taken from it after.
    through_store = per_task(0.0, STORE_OBJECT_PROBE_BYTES)
    work = 4e-3
    slowdown = max(1.0, (per_task(work) - overhead) / work)
    t0 = time.perf_counter()
    refs = [probe.remote(0.0, 8)[1] for _ in range(100)]
    submit = (time.perf_counter() - t0) / 100
    ray.get(refs)
    small = np.ones(16)
    put = WALL(lambda: ray.put(small))

    # A tensor from the task writing it to the task reading it, against a tiny one.
    def handed_over(nbytes: int) -> float:
        return WALL(lambda: ray.get(probe.remote(0.0, 8, probe.remote(0.0, nbytes)[0])[1]))

    big = 32 << 20
    store = big / max(handed_over(big) - handed_over(8), 1e-9)
    paid = Calibration(
        store_bytes_per_s=store, put_overhead_s=put, submit_s=submit, task_overhead_s=overhead
    )
    latency, driver, daemon = _executor_probe(paid)
    store_object = max(0.0, through_store - overhead - STORE_OBJECT_PROBE_BYTES / store)

    # A chain of tasks, each reading the export of the one before: through the store, a
    # link takes longer than the object's making and bytes account for.
    def per_link(nbytes: int, links: int = 10) -> float:
        def run() -> None:
            ref: Any = None
            for _ in range(links):
                ref, meta = probe.remote(0.0, nbytes, *([] if ref is None else [ref]))
            ray.get(meta)

        return Timer(5, 0.05, time.perf_counter)(run) / links

    waited = per_link(STORE_OBJECT_PROBE_BYTES) - per_link(8)
    store_wait = max(0.0, waited - store_object - STORE_OBJECT_PROBE_BYTES / store)
    cores = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0)
    return RayFigures(
        store,
        put,
        submit,
        overhead,
        latency,
        slowdown,
        driver,
        daemon,
        cores,
        store_object,
        store_wait,
    )


def probe_request() -> tuple[Graph, RunRequest]:
    """The executor probe's request (a Graph and a RunRequest): a few tiny nodes, one
    partition, so its run is Ray's costs and waits and next to no work."""
    from graphgrad.engine.autodiff import RunRequest
    from graphgrad.engine.ir import Graph, Node

    nodes = [Node(n, "input", shape=(16,), dtype="float64") for n in ("x", "w")]
    nodes += [Node("xw", "mul", ("x", "w")), Node("h", "tanh", ("xw",))]
    graph = Graph([*nodes, Node("loss", "sum", ("h",))])
    request = RunRequest(("loss",), {"x": np.full(16, 0.5), "w": np.full(16, 0.5)}, ("w",))
    return graph, request


def latency_from_run(run_s: float, sched: Schedule, cal: Calibration) -> float:
    """A dependency's latency from the Ray executor's run of `sched` taking `run_s`: the
    latency with which engine/simulator.py, given `cal`'s puts, submits and task overheads,
    predicts that run beyond its nodes' work. Its waits: each task's, from its submit or
    from the task it reads, and the driver's get of the result."""
    from graphgrad.engine.simulator import Cluster, predict_schedule  # it costs with this module

    def beyond_work(latency: float) -> float:
        p = predict_schedule(sched, Cluster(1, 1), dataclasses.replace(cal, task_latency_s=latency))
        return p.makespan - p.one_cpu

    paid = beyond_work(0.0)
    waits = beyond_work(1.0) - paid  # the probe is a chain: every wait is on its path
    return max(0.0, (run_s - paid) / waits)


def _executor_probe(cal: Calibration) -> tuple[float, ...]:
    """From the Ray executor itself running `probe_request` (the feeds put, its forward and
    backward tasks submitted, each waiting for what it reads, the driver's get of the
    result), with `cal`'s puts, submits and task overheads: a dependency's latency
    (`latency_from_run`); and the CPU the driver (this process, every thread) and the Ray
    daemons it started (none when it joined a running Ray: engine/proc_cpu.py) spend per
    task."""
    from graphgrad.engine.ray_executor import RayExecutor  # joins the Ray running here
    from graphgrad.engine.simulator import schedule_tasks

    graph, request = probe_request()
    executor = RayExecutor()
    _, sched = executor.plan(graph, request)
    tasks, _, objects = schedule_tasks(sched, cal)
    workers = sum(not t.on_caller for t in tasks)
    run = Timer(7, 0.05, time.perf_counter)(lambda: executor.run(graph, request))
    latency = latency_from_run(run, sched, cal)
    daemons = proc_cpu.daemons()
    runs = max(20, int(0.5 / max(run, 1e-4)))  # long enough for /proc's clock ticks
    driver, spent = time.process_time(), proc_cpu.cpu_seconds(daemons)
    for _ in range(runs):
        executor.run(graph, request)
    driver, spent = time.process_time() - driver, proc_cpu.cpu_seconds(daemons) - spent
    # Its puts are the staging the simulator charges.
    driver = max(driver / runs - objects * cal.put_overhead_s, 0.0)
    return latency, driver / workers, max(spent, 0.0) / (runs * workers)


def measure(quick: bool = False, ray_cpus: int | None = None) -> Calibration:
    """This machine's calibration; `quick`: smaller probes and no Ray (its figures stay the
    defaults, and `ray_measured` says so)."""
    cal = measure_compute(quick)
    if quick:
        return cal
    return with_ray(cal, measure_ray(ray_cpus))


def with_ray(cal: Calibration, ray: RayFigures) -> Calibration:
    return dataclasses.replace(cal, **dataclasses.asdict(ray), ray_measured=True)
