"""Chat steps with conversation memory, run on the worker that has the chat model loaded.

A ``chat`` step with a ``conversation_id`` (or with memory ``tools`` and a ``user_id``):

1. appends the step's own messages to the conversation (once, however often the step is
   retried), or answers the conversation's last message (``memory.upto``) when it has none;
2. embeds the turn on the embedding pool and recalls the user's nearest earlier messages
   and archival (long-term memory) entries;
3. assembles the context (:mod:`app.memory.context`), folding overflowing turns into the
   rolling summary first (:mod:`app.memory.summary`: inline on this model, or enqueued on
   ``CORRAL_MEMORY_SUMMARY_MODEL``);
4. generates; executes the memory tool calls in the reply (:mod:`app.memory.tools`) and
   generates again with their results, up to ``max_tool_rounds``;
5. appends the reply, queues the new messages for embedding, and reports in the output how
   many tokens each part of the prompt used.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

from app.core.errors import CorralError, NotFoundError, SpecError, StepInputError
from app.memory import embedding, summary, tools
from app.memory.context import Assembly, ContextRequest, PromptMessage, as_prompt, assemble
from app.memory.keys import tenant_of
from app.memory.options import MemoryOptions
from app.memory.recall import hits_with_messages
from app.memory.schemas import ArchiveHit, Block, Conversation, SearchHit
from app.memory.service import Memory, get_memory
from app.memory.store import NewMessage
from app.memory.vectors import Vectors
from app.store import db
from app.store.tables import WorkflowRun
from app.workflows.engine import StepWork
from workers.runtime import ModelRuntime, RunControl

log = logging.getLogger(__name__)

FORCING = {"required", *tools.ARGS}


def uses_memory(params: dict[str, Any]) -> bool:
    """Whether a chat step's (validated) input asks for conversation memory or tools."""
    return bool(params.get("conversation_id") or params.get("tools"))


def _tenant(workflow_id: str) -> str:
    with db.session_scope() as session:
        run = session.get(WorkflowRun, workflow_id)
        return tenant_of(run.api_key_id if run is not None else None)


def memory_chat(
    work: StepWork, runtime: ModelRuntime, params: dict[str, Any], control: RunControl
) -> dict[str, Any]:
    """Run one chat step with memory; returns its output."""
    mem = get_memory()
    tenant = _tenant(work.workflow_id)
    conv = None
    cid = params.get("conversation_id")
    if cid:
        conv = mem.conversations.find(tenant, cid)
        if conv is None:
            raise StepInputError(
                f"input.conversation_id: no conversation {cid!r} (deleted, expired, or not "
                "this API key's)"
            )
        if params.get("user_id") and params["user_id"] != conv.user_id:
            raise StepInputError(
                f"input.user_id {params['user_id']!r} is not the user of conversation {cid!r}"
            )
    user_id = conv.user_id if conv is not None else str(params["user_id"])
    turn = _Turn(mem, tenant, conv, user_id, work, runtime, params, control)
    try:
        if turn.opts.task == "consolidate":
            from workers.consolidate import consolidate

            return consolidate(mem, tenant, conv, runtime, params, turn.opts, control)
        return turn.summarise() if turn.opts.task == "summarise" else turn.reply()
    except (NotFoundError, SpecError) as exc:  # e.g. the conversation was deleted meanwhile
        raise StepInputError(str(exc)) from exc


class _Turn:
    """One chat step's work on a conversation."""

    def __init__(
        self,
        mem: Memory,
        tenant: str,
        conv: Conversation | None,
        user_id: str,
        work: StepWork,
        runtime: ModelRuntime,
        params: dict[str, Any],
        control: RunControl,
    ) -> None:
        self.mem, self.tenant, self.conv, self.user_id = mem, tenant, conv, user_id
        self.work, self.runtime, self.params, self.control = work, runtime, params, control
        self.opts = MemoryOptions.model_validate(params.get("memory") or {})
        self.window = min(runtime.n_ctx, self.opts.context_tokens or runtime.n_ctx)
        self.started = time.perf_counter()
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0}
        self.report: dict[str, Any] = {"conversation_id": conv.id if conv else None}
        self.report["user_id"] = user_id
        self.archive: list[ArchiveHit] = []  # long-term memory recalled for this turn

    # --- model calls --------------------------------------------------------------------

    def _chat(self, messages: list[PromptMessage], **override: Any) -> dict[str, Any]:
        out = self.runtime.chat({**self.params, "messages": messages, **override}, self.control)
        self.usage["prompt_tokens"] += int(out["prompt_tokens"])
        self.usage["completion_tokens"] += int(out["completion_tokens"])
        self.usage["calls"] += 1
        return out

    def _summarise_call(self, messages: list[PromptMessage], max_tokens: int) -> str:
        on_text, self.control.on_text = self.control.on_text, None  # not the reply: not streamed
        try:
            out = self._chat(messages, max_tokens=max_tokens, temperature=0.0, grammar=None)
        finally:
            self.control.on_text = on_text
        return str(out["text"])

    def _embed_query(self, text: str) -> Vectors:
        return cast(Vectors, embedding.embed_queries(self.mem, [text])[0])

    # --- the summarise task -------------------------------------------------------------

    def summarise(self) -> dict[str, Any]:
        conv = self.conv
        if conv is None:
            raise StepInputError("input.memory.task summarise needs a conversation_id")
        upto = min(self.opts.upto or conv.message_count, conv.message_count)
        try:
            if upto > conv.summary_upto:
                done = summary.fold(
                    self.mem,
                    self.runtime,
                    self.tenant,
                    conv,
                    upto,
                    self._summarise_call,
                    window=self.runtime.n_ctx,
                    max_tokens=int(self.params["max_tokens"]),
                )
                text, report = done.summary, {"upto": done.upto, "calls": done.calls}
                report["stored"] = done.stored
            else:
                text, report = conv.summary or "", {"upto": conv.summary_upto, "calls": 0}
        finally:
            summary.release(self.mem, self.tenant, conv.id)
        self.report |= {"task": "summarise", **report}
        return self._output(text, "stop", [], {})

    # --- the reply ----------------------------------------------------------------------

    def _record_input(self) -> tuple[list[PromptMessage], int]:
        """The turn being answered (recorded when asked to), and where history ends."""
        own = [m for m in self.params["messages"] if m["role"] != "system"]
        conv = self.conv
        if conv is None:
            return [dict(m) for m in own], 0
        if own and self.opts.record:
            new = [
                NewMessage(
                    role=m["role"],
                    content=m["content"],
                    tokens=self.runtime.count_tokens(m["content"]),
                    tokens_model=self.runtime.name,
                    metadata={"workflow_id": self.work.workflow_id, "step_id": self.work.step_id},
                )
                for m in own
            ]
            seqs = self.mem.conversations.append(
                self.tenant,
                conv,
                new,
                idempotency_key=f"wf:{self.work.workflow_id}:{self.work.step_id}:in",
                embed=embedding.embedding_on(self.mem),
            )
            embedding.kick(self.mem)
            self.report["appended"] = seqs
            pinned = [{**m, "seq": s} for m, s in zip(own, seqs, strict=True)]
            return pinned, seqs[0]
        if own:
            return [dict(m) for m in own], conv.message_count + 1
        upto = min(self.opts.upto or conv.message_count, conv.message_count)
        last = self.mem.conversations.messages(self.tenant, conv.id, [upto]) if upto else []
        if not last:
            raise StepInputError(
                f"conversation {conv.id!r} has no messages to answer and the step gives none"
            )
        return [{**as_prompt(last[0]), "seq": last[0].seq}], upto

    def _recall(self, pinned: list[PromptMessage]) -> list[SearchHit]:
        """The candidate earlier messages; the archival entries go to ``self.archive``
        (recalled with the same query vector)."""
        k, archive_k = self.opts.semantic_k, self.opts.archive_k
        if archive_k and not k and not self.mem.archive.count(self.tenant, self.user_id):
            archive_k = 0  # no long-term memory yet: no query to embed for it
        if not (k or archive_k) or not pinned or not embedding.embedding_on(self.mem):
            self.report["semantic"] = {"status": "off"}
            return []
        query = str(pinned[-1]["content"])
        try:
            vector = self._embed_query(query)
        except CorralError as exc:
            log.warning("semantic recall skipped: %s", exc)
            self.report["semantic"] = {"status": "unavailable", "error": str(exc)}
            return []
        cid = self.conv.id if self.conv else ""
        exclude = {(cid, int(m["seq"])) for m in pinned if "seq" in m}
        hits = []
        if k:
            hits = hits_with_messages(
                self.mem, self.tenant, self.user_id, vector, k * 3 + 16, exclude=exclude
            )
        self.archive = self.mem.archive.search(self.tenant, self.user_id, vector, archive_k)
        self.report["semantic"] = {
            "status": "ok",
            "candidates": len(hits),
            "archive_candidates": len(self.archive),
        }
        return hits

    def _request(
        self,
        pinned: list[PromptMessage],
        before: int,
        hits: list[SearchHit],
        blocks: dict[str, Block] | None,
        tools_text: str | None,
        extra: list[PromptMessage],
    ) -> ContextRequest:
        base = self.opts.system_prompt
        if base is None and self.conv is not None:
            base = self.conv.system_prompt
        system_parts = [base] if base else []
        system_parts += [m["content"] for m in self.params["messages"] if m["role"] == "system"]
        return ContextRequest(
            tenant=self.tenant,
            conversation=self.conv,
            system_prompt="\n\n".join(system_parts) or None,
            blocks=blocks,
            tools_text=tools_text,
            pinned=pinned,
            before_seq=before,
            window=self.window,
            max_tokens=int(self.params["max_tokens"]),
            semantic=hits,
            semantic_k=self.opts.semantic_k,
            semantic_share=self.opts.semantic_share,
            recent_limit=self.opts.recent_limit,
            extra=extra,
            archive=self.archive,
            archive_k=self.opts.archive_k,
        )

    def _fold(self, asm: Assembly) -> bool:
        """Fold overflowing turns into the summary; True when it changed (inline)."""
        conv = self.conv
        if conv is None or not asm.overflow or not self.opts.summarise or asm.fold_upto is None:
            self.report["summary"] = {"action": "none", "upto": conv.summary_upto if conv else 0}
            return False
        target = self.mem.settings.memory_summary_model or self.runtime.name
        if target != self.runtime.name:
            wid = summary.enqueue(self.mem, self.tenant, conv, asm.fold_upto, self.mem.settings)
            self.report["summary"] = {
                "action": "enqueued" if wid else "already_queued",
                "model": target,
                "upto": asm.fold_upto,
                "workflow_id": wid,
            }
            return False
        done = summary.fold(
            self.mem,
            self.runtime,
            self.tenant,
            conv,
            asm.fold_upto,
            self._summarise_call,
            window=self.runtime.n_ctx,
            max_tokens=self.mem.settings.memory_summary_max_tokens,
        )
        self.report["summary"] = {
            "action": "inline",
            "model": self.runtime.name,
            "folded": done.upto - conv.summary_upto,
            "upto": done.upto,
            "calls": done.calls,
            "tokens": done.tokens,
        }
        self.conv = self.mem.conversations.get(self.tenant, conv.id)
        return True

    def reply(self) -> dict[str, Any]:
        p = self.params
        pinned, before = self._record_input()
        hits = self._recall(pinned)
        blocks = self.mem.blocks.all(self.tenant, self.user_id) if self.opts.blocks else None
        enabled = list(p.get("tools") or []) if p.get("tool_choice") != "none" else []
        tool_blocks = blocks or {}
        if enabled and not tool_blocks:
            tool_blocks = self.mem.blocks.all(self.tenant, self.user_id)
        tools_text = tools.instructions(enabled, list(tool_blocks)) if enabled else None
        extra: list[PromptMessage] = []
        asm = assemble(
            self.mem.conversations,
            self.runtime,
            self._request(pinned, before, hits, blocks, tools_text, extra),
        )
        if self._fold(asm):
            asm = assemble(
                self.mem.conversations,
                self.runtime,
                self._request(pinned, before, hits, blocks, tools_text, extra),
            )
        ctx = tools.ToolContext(
            mem=self.mem,
            tenant=self.tenant,
            user_id=self.user_id,
            conversation=self.conv,
            source=f"model:{self.runtime.name} workflow={self.work.workflow_id} "
            f"step={self.work.step_id}",
            embed_query=self._embed_query,
            allowed=enabled,
            scope=f"{self.work.workflow_id}:{self.work.step_id}",
        )
        calls: list[dict[str, Any]] = []
        rounds: list[dict[str, Any]] = []
        choice = p.get("tool_choice", "auto")
        for rnd in range(int(p.get("max_tool_rounds", 0)) + 1):
            forced = rnd == 0 and enabled and choice in FORCING
            allowed = enabled if choice == "required" else [choice]
            gbnf = tools.grammar(allowed, tool_blocks) if forced else None
            # Without memory tools the step's own response_format or functions apply.
            out = self._chat(asm.messages, **({"grammar": gbnf} if enabled else {}))
            rounds.append(
                {
                    "prompt_tokens": out["prompt_tokens"],
                    "completion_tokens": out["completion_tokens"],
                    "parts": asm.tokens,
                    "forced": bool(gbnf),
                }
            )
            found = tools.parse_tool_calls(out["text"]) if enabled else []
            results = [tools.execute(ctx, c, f"{rnd}:{i}") for i, c in enumerate(found)]
            if gbnf and not found:
                calls.append(
                    {
                        "round": rnd,
                        "tool": None,
                        "ok": False,
                        "error": f"the forced tool call was cut off at max_tokens "
                        f"({p['max_tokens']}); give it more room",
                    }
                )
            calls += [{"round": rnd, **r} for r in results]
            if not results or rnd == int(p.get("max_tool_rounds", 0)):
                break
            extra += [
                {"role": "assistant", "content": out["text"]},
                {"role": "user", "content": tools.results_message(results)},
            ]
            tool_blocks = self.mem.blocks.all(self.tenant, self.user_id)
            if blocks is not None:
                blocks = tool_blocks
            asm = self._fit_tool_round(pinned, before, hits, blocks, tools_text, extra)
        self.report |= {"tokens": asm.tokens, "rounds": rounds}
        self.report["counts"] = {
            "recent": len(asm.recent),
            "semantic": len(asm.semantic),
            "archive": len(asm.archive),
        }
        self.report["recalled"] = [
            {"conversation_id": m.conversation_id, "seq": m.seq, "score": h.score}
            for h in asm.semantic
            if (m := h.message) is not None
        ]
        self.report["recalled_archive"] = [
            {"id": h.entry.id, "kind": h.entry.kind, "score": h.score} for h in asm.archive
        ]
        self._record_reply(out["text"], calls)
        result = self._output(out["text"], out["finish_reason"], calls, out.get("timings") or {})
        if out.get("function_calls"):
            result["function_calls"] = out["function_calls"]
        return result

    def _fit_tool_round(
        self,
        pinned: list[PromptMessage],
        before: int,
        hits: list[SearchHit],
        blocks: dict[str, Block] | None,
        tools_text: str | None,
        extra: list[PromptMessage],
    ) -> Assembly:
        """Assemble again with the tool results, shortening them until they fit."""
        while True:
            try:
                return assemble(
                    self.mem.conversations,
                    self.runtime,
                    self._request(pinned, before, hits, blocks, tools_text, extra),
                )
            except StepInputError:
                text = str(extra[-1]["content"])
                if len(text) < 64:
                    raise
                extra[-1] = {"role": "user", "content": text[: len(text) // 2] + "\n…(cut)"}

    def _record_reply(self, text: str, calls: list[dict[str, Any]]) -> None:
        conv = self.conv
        if conv is None or not self.opts.record:
            return
        meta: dict[str, Any] = {"workflow_id": self.work.workflow_id, "step_id": self.work.step_id}
        if calls:
            meta["tool_calls"] = [{"tool": c["tool"], "ok": c["ok"]} for c in calls]
        seqs = self.mem.conversations.append(
            self.tenant,
            conv,
            [
                NewMessage(
                    role="assistant",
                    content=text,
                    tokens=self.runtime.count_tokens(text),
                    tokens_model=self.runtime.name,
                    metadata=meta,
                )
            ],
            idempotency_key=f"wf:{self.work.workflow_id}:{self.work.step_id}:out",
            embed=embedding.embedding_on(self.mem),
        )
        embedding.kick(self.mem)
        self.report["reply_seq"] = seqs[0]

    def _output(
        self,
        text: str,
        finish_reason: str | None,
        calls: list[dict[str, Any]],
        timings: dict[str, Any],
    ) -> dict[str, Any]:
        total_ms = (time.perf_counter() - self.started) * 1000
        return {
            "text": text,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
            "prompt_tokens": self.report.get("rounds", [{}])[-1].get(
                "prompt_tokens", self.usage["prompt_tokens"]
            ),
            "completion_tokens": self.usage["completion_tokens"],
            "timings": {**timings, "total_ms": round(total_ms, 3)},
            "memory": self.report,
            "tool_calls": calls,
        }
