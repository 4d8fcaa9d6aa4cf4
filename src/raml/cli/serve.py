"""``raml serve``: run the query service (HTTP API + web page) over an index directory; flags -> typed calls.

The service embeds each query with the student (a checkpoint, or an ONNX model written by ``raml export``)
at the query size, micro-batches concurrent queries, and searches the teacher's index built by
``raml index``; new generations committed into the index directory are served without a restart
(see :mod:`raml.deploy.service`).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
from pathlib import Path

from raml.cli.choices import INLINE_DECODE_PIXELS, SERVICE_LIMITS
from raml.cli.common import MAX_THREADS, device_from_args, positive_int, setup_logging, threads_int
from raml.entry import non_negative_int

logger = logging.getLogger("raml")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_QUERY_SIZE = 224


def non_negative_float(value: str) -> float:
    """A finite number >= 0 (argparse names the flag when it is refused; inf and nan are refused: the
    service reports its settings as JSON, which has neither)."""
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value}")
    return number


def positive_float(value: str) -> float:
    """A finite number > 0 (inf and nan refused, as by :func:`non_negative_float`)."""
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {value}")
    return number


def late_share(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 0.1:
        raise argparse.ArgumentTypeError(f"expected a share of queries from 0 (off) to 0.1 (e.g. 0.005), got {value}")
    return number


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` sub-command."""
    defaults = argparse.Namespace(**SERVICE_LIMITS)  # ServiceLimits()'s fields, without importing the service
    parser = subparsers.add_parser(
        "serve",
        description=(
            "Serve top-k searches of an index built by `raml index` over HTTP: POST /search (an image as multipart "
            "field 'image' or as a raw image/* body), GET /health, GET /metrics (Prometheus), GET /image/ID and a "
            "web page at /. Concurrent queries are embedded together (micro-batching); new index generations are "
            "picked up without a restart. Binds to 127.0.0.1 (this machine only) unless --host says otherwise; "
            "--host 0.0.0.0 makes it reachable from the network, with no authentication."
        ),
    )
    parser.add_argument("--index", type=Path, required=True, metavar="INDEX_DIR", help="index built by raml index")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--network-path", metavar="NETWORK", help="query network checkpoint (the student)")
    source.add_argument("--onnx", type=Path, metavar="FILE", help="an ONNX model written by `raml export`")
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        metavar="QR",
        help=f"default query size (default {DEFAULT_QUERY_SIZE}; with --onnx the exported size; a network whose "
        "meta lists image_sizes serves those, a request picks one with ?size=)",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}: this machine only; 0.0.0.0: every interface, reachable "
        "from the network without authentication)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="NAME",
        help="a name clients reach the service by (repeatable, or a comma list; any port): requests whose Host "
        "header names another get 421, against DNS rebinding. Always allowed: 127.0.0.1, localhost, ::1 and the "
        "--host address unless it is 0.0.0.0 or ::, where the names must be given here. '*': any Host, only "
        "behind a reverse proxy that checks it",
    )
    adaptive = parser.add_argument_group("latency target (a network trained for several query sizes)")
    adaptive.add_argument(
        "--latency-target-ms",
        type=positive_float,
        default=None,
        metavar="T",
        help="keep the p99 latency under T ms by answering at the largest trained query size predicted to meet it "
        "(measured queue delay and batch time per size, smoothed; the size in use is updated as batches form and "
        "taken by each query when it is decoded): smaller sizes under load, back up when it falls; the queue is "
        "bounded by what T leaves at the size in use; a request's ?size= still pins its size. Needs a network "
        "whose meta lists image_sizes",
    )
    adaptive.add_argument(
        "--latency-up-fraction",
        type=positive_float,
        default=0.7,
        metavar="F",
        help="hysteresis: step up to a larger size only when it is predicted within F x T (0 < F < 1, default 0.7)",
    )
    adaptive.add_argument(
        "--late-budget",
        type=late_share,
        default=defaults.late_budget,
        metavar="F",
        help="a p99 target lets 1 %% of answers be late: at the smallest size, admit up to this share of the queries "
        "(counted over the last 2,000 arrivals, e.g. 0.005) past their wait bound, within one more full batch, and "
        "answer them late rather than refuse them (503); default 0: refuse them (in trials at 2x saturation it "
        "answered a few late, still refused some and raised the p99; ignored with --max-queue-wait-ms)",
    )
    group = parser.add_argument_group("batching and limits")
    group.add_argument(
        "--max-batch", type=positive_int, default=defaults.max_batch, metavar="N", help="most queries per forward pass"
    )
    group.add_argument(
        "--max-wait-ms",
        type=non_negative_float,
        default=defaults.max_wait_ms,
        metavar="MS",
        help=f"longest wait for more queries once a batch has one (default {defaults.max_wait_ms:g})",
    )
    group.add_argument(
        "--queue-size",
        type=positive_int,
        default=defaults.queue_size,
        metavar="N",
        help=f"most queries waiting; beyond it requests get 503 with Retry-After (default {defaults.queue_size})",
    )
    group.add_argument(
        "--max-queue-wait-ms",
        type=positive_float,
        default=defaults.max_queue_wait_ms,
        metavar="MS",
        help="longest predicted (and actual) wait of a query for its batch to start (after its decoding); beyond it "
        "503 with Retry-After (default: --max-wait-ms plus two full batches' measured service time less a batch of "
        "the recent size, so at least one full batch, at least 50 ms; with --latency-target-ms, the larger of that "
        "and T less a full batch and the window, at the size in use)",
    )
    group.add_argument(
        "--queue-wait-counts-front-end",
        action="store_true",
        help="take the front end's measured p90 (receiving, decoding, writing the answer) off the default "
        "--max-queue-wait-ms, so an admitted query is answered within the promise with its front end counted; "
        "refuses more at moderate load on a busy host (default off)",
    )
    group.add_argument(
        "--defer-early-arrivals",
        action="store_true",
        help="past saturation, refuse a query (503, before decoding) when the queries arriving later in the batch "
        "period will fill its batch anyway, so that a batch holds the queries that wait least: a lower median "
        "latency under overload (a fixed query size only; default off: arrival order)",
    )
    group.add_argument(
        "--no-overload-margin",
        dest="overload_margin",
        action="store_false",
        help="keep the default --max-queue-wait-ms when overloaded; by default, while arrivals are refused on their "
        "predicted wait in half of the recent batch periods, the bound loses the front end's p90 and twice the "
        "forward passes' overrun p90, so that the queries admitted past saturation are answered within the "
        "promise (a fixed query size only)",
    )
    group.add_argument(
        "--max-bytes",
        type=positive_int,
        default=defaults.max_bytes,
        metavar="N",
        help=f"largest request body in bytes; larger gets 413 (default {defaults.max_bytes})",
    )
    group.add_argument(
        "--max-pixels",
        type=positive_int,
        default=defaults.max_pixels,
        metavar="N",
        help="largest image (width x height), and largest image after the resize to the query size (an extreme "
        f"aspect ratio), both read before decoding; larger gets 413 (default {defaults.max_pixels})",
    )
    group.add_argument(
        "--max-uploads",
        type=positive_int,
        default=defaults.max_uploads,
        metavar="N",
        help="most request bodies being received at once; more get 503 with Retry-After before their body is read "
        f"(default {defaults.max_uploads})",
    )
    group.add_argument(
        "--max-decodes",
        type=positive_int,
        default=defaults.max_decodes,
        metavar="N",
        help=f"most images being decoded at once; more get 503 with Retry-After before decoding (default "
        f"{defaults.max_decodes})",
    )
    group.add_argument(
        "--max-decode-pixels",
        type=positive_int,
        default=defaults.max_decode_pixels,
        metavar="N",
        help="most pixels (width x height, from the headers) of the images being decoded at once, ~7 bytes of "
        "memory each; an image that does not fit gets 503 before decoding, one image is always admitted alone "
        f"(default {defaults.max_decode_pixels})",
    )
    group.add_argument(
        "--inline-decode-pixels",
        type=non_negative_int,
        default=INLINE_DECODE_PIXELS,
        metavar="N",
        help="decode images of at most N pixels (from the header) on the event loop instead of a worker thread "
        "(0: every image in a thread; default %(default)s)",
    )
    group.add_argument(
        "--header-timeout",
        type=positive_float,
        default=defaults.header_timeout_s,
        metavar="S",
        help="seconds a connection has to send complete request headers; then 408 and closed "
        f"(default {defaults.header_timeout_s:g})",
    )
    group.add_argument(
        "--body-timeout",
        type=positive_float,
        default=defaults.body_timeout_s,
        metavar="S",
        help=f"seconds a request has to send its whole body; then 408 and closed (default {defaults.body_timeout_s:g})",
    )
    group.add_argument(
        "--send-timeout",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="seconds a connection may read none of its responses (the server's writes stay blocked); then it is "
        "closed (default %(default)g)",
    )
    group.add_argument(
        "--max-connections",
        type=positive_int,
        default=defaults.max_connections,
        metavar="N",
        help=f"most connections open at once; more get 503 and are closed (default {defaults.max_connections})",
    )
    group.add_argument(
        "--max-k",
        type=positive_int,
        default=defaults.max_k,
        metavar="K",
        help=f"largest k (default {defaults.max_k}); a request that gives no k gets the smaller of 10 and K",
    )
    group.add_argument(
        "--poll-interval",
        type=positive_float,
        default=defaults.poll_interval_s,
        metavar="S",
        help=f"seconds between checks for a new index generation (default {defaults.poll_interval_s:g})",
    )
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--data-root", default="data", metavar="DATA_DIR", help="folder holding networks/")
    runtime.add_argument("--device", default="auto", help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', ...")
    runtime.add_argument(
        "--threads",
        type=threads_int,
        default=None,
        metavar="N",
        help=f"intra-op threads of the query network, 1 to {MAX_THREADS} (default: half the cores, at least 1; the "
        "rest decode images and run the HTTP server)",
    )
    runtime.add_argument(
        "--eager",
        action="store_true",
        help="run the query network operator by operator in Python (default: one TorchScript trace per query size, "
        "kept only where it equals the network bit for bit: its forward pass does not wait for the GIL behind the "
        "event loop)",
    )
    runtime.add_argument(
        "--channels-last",
        action="store_true",
        help="serve a copy of the query network in the channels-last memory format: its convolutions ran 1.26-1.51x "
        "faster on a 2-core CPU (+23-26 %% batched throughput), its embeddings differ from raml search's in the "
        "last float32 bits (max 1.3e-7; default off: equal bit for bit)",
    )
    runtime.add_argument(
        "--http",
        choices=("auto", "httptools", "h11"),
        default="auto",
        help="HTTP protocol: httptools (llhttp, in C; pip install raml[serve]) or h11 (pure Python, slower under "
        "load); auto: httptools where installed (default). Both keep the connection limits above",
    )
    runtime.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop (libuv) or asyncio's own; auto: uvloop where installed (default)",
    )
    runtime.add_argument("--verbose", action="store_true", help="debug logging and uvicorn's access log")
    parser.set_defaults(func=run_serve)


def _require_serve_deps() -> None:
    import importlib

    from raml.deploy.faiss_index import import_faiss

    for module in ("starlette", "uvicorn", "python_multipart", "prometheus_client"):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise SystemExit(
                f"raml serve: error: needs {module}; install the service's dependencies with `pip install raml[serve]`."
            ) from error
    import_faiss()


def build_service(args: argparse.Namespace):  # -> SearchService (imported lazily: optional dependencies)
    """The :class:`~raml.deploy.service.SearchService` the flags describe (network and index loaded)."""
    from raml.deploy.service import OnnxQueryEmbedder, SearchService, ServiceLimits, TorchQueryEmbedder
    from raml.models import load_network

    limits = ServiceLimits(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        max_queue_wait_ms=args.max_queue_wait_ms,
        max_bytes=args.max_bytes,
        max_pixels=args.max_pixels,
        max_k=args.max_k,
        poll_interval_s=args.poll_interval,
        max_uploads=args.max_uploads,
        max_decodes=args.max_decodes,
        max_decode_pixels=args.max_decode_pixels,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
        queue_wait_counts_front_end=args.queue_wait_counts_front_end,
        defer_early_arrivals=args.defer_early_arrivals,
        overload_margin=args.overload_margin,
        late_budget=args.late_budget,
    )
    if args.onnx is not None:
        embedder = OnnxQueryEmbedder(args.onnx, args.image_size)
    else:
        device = device_from_args(args)
        network = load_network(args.network_path, data_root=args.data_root, device=device)
        size = args.image_size
        if size is None and not network.meta.get("image_sizes"):
            size = DEFAULT_QUERY_SIZE
        embedder = TorchQueryEmbedder(network, device, size, graph=not args.eager, channels_last=args.channels_last)
    return SearchService(
        embedder, args.index, limits, latency_target_ms=args.latency_target_ms, up_fraction=args.latency_up_fraction
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_url(host: str, port: int) -> str:
    """The URL of the service as this machine reaches it. Bound to every interface (0.0.0.0, ::), the loopback
    address of that family: ``http://0.0.0.0:PORT/`` names no host, and the service refuses ``Host: 0.0.0.0``
    with 421 (it answers only names it knows, see :class:`raml.deploy.service.hosts.HostRules`). An IPv6 address
    is put in brackets."""
    from raml.deploy.service.hosts import binds_every_interface

    name = host.strip()
    if binds_every_interface(name):
        name = "::1" if name == "::" else "127.0.0.1"
    return f"http://[{name}]:{port}/" if ":" in name else f"http://{name}:{port}/"


def host_rules(args: argparse.Namespace):  # -> HostRules (imported lazily, as the service is)
    """The ``Host`` names the service answers: ``--allowed-host`` (each a name or a comma list), the loopback names
    and ``--host`` unless it binds every interface; warns where such a bind is given no name."""
    from raml.deploy.service.hosts import HostRules, binds_every_interface

    extra = [name for value in args.allowed_host or () for name in value.split(",") if name.strip()]
    rules = HostRules(extra, bind_host=args.host)
    if rules.any_host:
        logger.warning("--allowed-host *: any Host is answered; only behind a reverse proxy that checks Host itself.")
    elif not extra and binds_every_interface(args.host):
        logger.warning(
            "Bound to %s without --allowed-host: only requests naming %s are answered (others get 421); give the "
            "names clients use with --allowed-host NAME.",
            args.host,
            ", ".join(rules.describe()),
        )
    return rules


def freeze_startup_objects() -> int:
    """Move every object alive now (the network, the index, the imported libraries) to the garbage collector's
    permanent generation, so that a full collection while serving scans only what was made since.

    With torch, faiss and the web stack loaded a server holds ~450,000 tracked objects; on the project's 2-core
    machine each full collection then stopped the whole process (event loop, decode threads, batching worker) for
    140-330 ms, two or three times in each ``raml bench serve`` run's measured rows: the tail of every latency
    percentile (8-13 ms with the objects frozen). Returns the number frozen.
    """
    import gc

    gc.collect()  # what is garbage now is not frozen
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("Froze %d objects alive at start-up (out of the garbage collector's full collections)", frozen)
    return frozen


def run_serve(args: argparse.Namespace) -> int:
    """``raml serve``: blocks until interrupted (Ctrl-C)."""
    setup_logging(args.verbose)
    _require_serve_deps()
    import uvicorn

    from raml.deploy.service.app import create_app
    from raml.deploy.service.connections import resolve_http, resolve_loop, server_options
    from raml.deploy.service.embedders import use_serving_threads
    from raml.deploy.service.hosts import binds_every_interface

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}.")
    try:
        http, loop = resolve_http(args.http), resolve_loop(args.loop)
    except ImportError as error:
        raise SystemExit(f"raml serve: error: {error}") from None
    hosts = host_rules(args)  # a bad --allowed-host or --host is refused before anything is loaded
    use_serving_threads(args.threads)
    service = build_service(args)
    if not _is_loopback(args.host):
        logger.warning(
            "Binding to %s: the service is reachable from the network, and it has no authentication; anyone who "
            "can reach the port can search the index and fetch its images.",
            args.host,
        )
    options = server_options(
        service.limits.header_timeout_s,
        service.limits.max_connections,
        http=http,
        loop=loop,
        send_timeout_s=args.send_timeout,
        on_refusal=service.metrics.record_connection_refusal,
    )
    index = service.index.current
    logger.info(
        "Serving %d images (generation %d) of %s at %s%s (query sizes %s%s; HTTP %s, loop %s)",
        len(index),
        index.generation,
        index.directory,
        local_url(args.host, args.port),
        f" (bound to {args.host}: every interface)" if binds_every_interface(args.host) else "",
        ", ".join(map(str, service.embedder.sizes)),
        f"; chosen per batch for a p99 under {args.latency_target_ms:g} ms" if service.adaptive is not None else "",
        http,
        loop,
    )
    del index  # the service swaps generations: this name must not keep the first one (and its mapped files) alive
    app = create_app(service, args.inline_decode_pixels, hosts)
    freeze_startup_objects()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="debug" if args.verbose else "info",
        access_log=args.verbose,
        **options,
    )
    return 0
