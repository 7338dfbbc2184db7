"""Horovod's Gloo rendezvous for a TFJob, served by a child of rank 0.

    python -m tf_codistill.rendezvous_server PORT SCOPE KEY PLAN_JSON HOST

`tf_codistill.tfjob` starts it: a `RendezvousHTTPServer` initialised with
the slot plan (as horovodrun's `RendezvousServer.init` does) on `HOST:PORT`
("" for every interface), holding `PLAN_JSON["cluster"]` under `SCOPE/KEY`
so that every task can check it sees the same cluster. Prints "ready" once
it listens, or "error: ..." and exits 1 when it cannot bind; serves until
its stdin closes (rank 0 exited, or closed it at its exit).

It runs in its own process, as it does in horovodrun's: rank 0's main
thread holds the GIL while TensorFlow blocks in MultiWorkerMirroredStrategy's
start-up (TFE_EnableCollectiveOps waits for the group's other workers), so a
server thread in rank 0 would stop answering the workers that still need the
store, and the job would hang.
"""

from __future__ import annotations

import json
import sys
import threading


def serve(port: int, scope: str, key: str, plan: dict, host: str) -> int:
    from horovod.runner.common.util.hosts import SlotInfo
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

    try:
        httpd = RendezvousHTTPServer((host, port), RendezvousHandler, False)
    except OSError as err:
        print(f"error: {err}", flush=True)
        return 1
    httpd.init([SlotInfo(**slot) for slot in plan["slots"]])  # scope sizes, as gloo_run does
    httpd.cache[scope] = {key: json.dumps(plan["cluster"]).encode()}
    threading.Thread(target=lambda: (sys.stdin.read(), httpd.shutdown()), daemon=True).start()
    print("ready", flush=True)
    httpd.serve_forever()  # until rank 0 closes our stdin
    httpd.server_close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit("usage: python -m tf_codistill.rendezvous_server PORT SCOPE KEY PLAN_JSON HOST")
    sys.exit(serve(int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]))
