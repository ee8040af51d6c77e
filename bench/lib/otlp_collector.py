#!/usr/bin/env python3
"""A minimal OTLP/gRPC trace collector for the bench: receives the spans berth's daemons export
(`[telemetry] otlp_endpoint`) and appends one JSON object per span to a file.

    otlp_collector.py --port 0 --out spans.jsonl --ready-file port.txt

Needs grpcio and opentelemetry-proto (bench/run.sh installs them into target/bench-venv from
PyPI). Runs until SIGTERM/SIGINT; every span is written (and flushed) as it arrives.
"""
import argparse
import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def attr_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    val = getattr(v, kind)
    if kind in ("array_value", "kvlist_value"):
        return str(val)
    return val


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def Export(self, request, context):
        lines = []
        for rs in request.resource_spans:
            service = ""
            for a in rs.resource.attributes:
                if a.key == "service.name":
                    service = attr_value(a.value)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(json.dumps({
                        "service": service,
                        "name": s.name,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_id": s.parent_span_id.hex(),
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "attrs": {a.key: attr_value(a.value) for a in s.attributes},
                    }))
        with self.lock:
            for line in lines:
                self.out.write(line + "\n")
            self.out.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ready-file", required=True)
    args = ap.parse_args()
    out = open(args.out, "a", encoding="utf-8")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(out), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    with open(args.ready_file + ".tmp", "w") as f:
        f.write(str(port))
    import os
    os.rename(args.ready_file + ".tmp", args.ready_file)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
