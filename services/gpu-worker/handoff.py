"""The worker's side of the prefill → decode KV hand-off.

A prefill worker leaves a handed-off request's KV in its host pool (``_export_kv``) and reports
the handle in ``TurnDone.exported``; the scheduler passes it to the decode worker in
``AssignRequest.kv``, whose ``_import_kv`` copies it into its own pool: mapped from the pool file
when both run on one node, fetched over a direct connection to the prefill worker's transfer
server (``aegaeon/transfer.py``) when they do not. Either way the decode worker reports
``KVImported`` — after which the scheduler lets the source free its copy — or, when the import
fails, re-prefills the request from prompt + tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from aegaeon.gpu_worker.worker_core import WorkerCore

from aegaeon import metrics
from aegaeon.protocol import AssignRequest, KVHandle, KVImported, RunTurn, TurnDone
from aegaeon.telemetry import RequestTrace, record_span
from aegaeon.transfer import TransferServer, fetch

log = logging.getLogger(__name__)


class KVHandoff(WorkerCore):
    kv_server: TransferServer | None = None

    async def _start_kv_server(self, address: str) -> None:
        """Serve this worker's exported KV to decode workers on other nodes from ``address``."""
        self.kv_server = TransferServer(address)
        await self.kv_server.start()

    async def _stop_kv_server(self) -> None:
        if self.kv_server is not None:
            await self.kv_server.stop()

    @property
    def kv_endpoint(self) -> str:
        return self.kv_server.endpoint if self.kv_server is not None else ""

    def _withdraw_kv(self, request_id: str) -> None:
        if self.kv_server is not None:
            self.kv_server.withdraw(request_id)

    async def _export_kv(self, command: RunTurn, done: TurnDone) -> None:
        """Leave the KV of the requests handed to a decode worker in the host pool; they stay
        held (the pool keeps their bytes) until the scheduler's AbortRequest. With a KV
        transfer server the handle also says where a worker on another node fetches them."""
        for rid in command.export_kv:
            if rid not in self.held:
                continue  # finished in this turn
            try:
                handle = await self._on_engine(self.engine.export_kv, rid)
            except Exception as exc:  # fallback-runner model, full pool: the target re-prefills
                log.info("KV of %s not exported: %s", rid, exc)
                continue
            self.held[rid].swapped = True
            if self.kv_server is None:
                done.exported[rid] = msgspec.structs.replace(handle, node=self.node)
            else:
                # Until the scheduler frees the KV (the decode worker may be assigned it late).
                pool = self.engine.host_kv.path
                token = self.kv_server.offer(rid, pool, handle.offset, handle.nbytes, float("inf"))
                done.exported[rid] = msgspec.structs.replace(
                    handle, node=self.node, endpoint=self.kv_server.endpoint, token=token
                )

    async def _import_kv(
        self, command: AssignRequest, args: tuple[Any, ...], traced: RequestTrace | None
    ) -> bool:
        """Copy the KV another worker exported into this engine's host pool. Reports
        KVImported either way (the source may then free its copy); False: the request is
        re-prefilled here from prompt + tokens instead."""
        assert command.kv is not None
        rid, source, handle = command.request_id, command.kv_source or "", command.kv
        across = bool(handle.node) and handle.node != self.node
        start, start_ns = time.monotonic(), time.time_ns()
        try:
            if across:
                await self._fetch_kv(args, handle)
            else:
                await self._on_engine(self.engine.import_kv, *args, handle)
        except Exception as exc:  # the source died, its pool is full or gone: re-prefill
            log.warning("KV of %s from %s not imported: %s", rid, source, exc)
            if rid in self.engine.request_ids():
                await self._on_engine(self.engine.abort, rid)
            event = KVImported(self.worker_id, rid, source, ok=False, across_nodes=across,
                               message=f"{type(exc).__name__}: {exc}")  # fmt: skip
        else:
            seconds = time.monotonic() - start
            metrics.KV_HANDOFF.labels(command.model).observe(seconds)
            event = KVImported(self.worker_id, rid, source, ok=True, seconds=seconds,
                               bytes=handle.nbytes, across_nodes=across)  # fmt: skip
            if traced is not None:
                record_span("aegaeon.kv_handoff", traced.context, start_ns, time.time_ns(),
                            {"aegaeon.request_id": rid, "aegaeon.kv_handoff.source": source,
                             "aegaeon.kv_handoff.bytes": handle.nbytes,
                             "aegaeon.kv_handoff.across_nodes": across})  # fmt: skip
        await self.bus.publish(self.subjects.worker_events(self.worker_id), event)
        return event.ok

    async def _fetch_kv(self, args: tuple[Any, ...], handle: KVHandle) -> None:
        """Across nodes: reserve the bytes in this pool, receive them from the source's KV
        transfer server (in a thread: the event loop and the engine go on), then admit."""
        if not handle.endpoint:
            raise RuntimeError(f"the KV lies on node {handle.node!r}, whose worker serves no KV")
        request_id, model, prompt, _sampling, outputs = args
        offset = await self._on_engine(
            self.engine.reserve_kv_import, request_id, model, prompt, outputs, handle
        )
        try:
            region = self.engine.host_kv_view(offset, handle.nbytes).numpy()
            await asyncio.to_thread(fetch, handle.endpoint, handle.token, memoryview(region))
        except BaseException:
            await self._on_engine(self.engine.release_kv_import, offset, handle.nbytes)
            raise
        await self._on_engine(self.engine.admit_kv_import, *args, handle, offset)
