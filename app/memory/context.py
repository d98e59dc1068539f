"""Context assembly: fit a chat step's prompt to the model's window, counting with its tokenizer.

The prompt is, in this order::

    system:  system prompt · memory blocks · rolling summary · long-term memory
             · recalled messages · tools
    the latest turns of the conversation (as many as fit, oldest first)
    the turn being answered (always), then any tool rounds of this step

The budget is the window (the model's ``n_ctx``, or ``memory.context_tokens``) minus
``max_tokens``. The fixed parts come first; the latest turns may take what is left except
a reserve of ``memory.semantic_share`` for what is recalled by similarity — archival
entries (long-term memory, one line each) and earlier messages — only as much as they
need; they fill what the latest turns leave, archival entries first. Every part is
counted with the model's own tokenizer and the finished prompt is counted exactly through
the model's chat template; while it is over budget the least valuable piece is dropped
(the last recalled message, then the last archival entry, then the oldest turn). When
older unsummarised turns did not fit, :attr:`Assembly.fold_upto` says through which seq to
fold them into the rolling summary so that the rest takes at most half of the latest
turns' share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from app.core.errors import StepInputError
from app.memory.schemas import ArchiveHit, Block, Conversation, Message, SearchHit
from app.memory.store import ConversationStore

PromptMessage = dict[str, Any]
CHUNK = 64  # messages read per round trip while walking back through history


class Tokenizer(Protocol):
    """The model's tokenizer: plain text, and a whole prompt through its chat template."""

    name: str

    def count_tokens(self, text: str) -> int: ...

    def count_chat_tokens(self, messages: list[dict[str, Any]]) -> int: ...


@dataclass
class ContextRequest:
    """Everything assembly needs besides the store and the tokenizer."""

    tenant: str
    conversation: Conversation | None
    system_prompt: str | None
    blocks: dict[str, Block] | None
    tools_text: str | None
    pinned: list[PromptMessage]  # the turn being answered: always in, after the history
    before_seq: int  # history = messages with summary_upto < seq < before_seq
    window: int
    max_tokens: int
    semantic: list[SearchHit] = field(default_factory=list)  # candidates, best first
    semantic_k: int = 4  # at most this many recalled
    semantic_share: float = 0.25
    recent_limit: int | None = None
    extra: list[PromptMessage] = field(default_factory=list)  # this step's tool rounds
    archive: list[ArchiveHit] = field(default_factory=list)  # candidates, best first
    archive_k: int = 3  # at most this many archival entries


@dataclass
class Assembly:
    """The prompt, what went into it, and how many tokens each part took."""

    messages: list[PromptMessage]
    tokens: dict[str, int]
    recent: list[Message]
    semantic: list[SearchHit]
    overflow: bool
    fold_upto: int | None
    archive: list[ArchiveHit] = field(default_factory=list)


def message_tokens(m: Message, tok: Tokenizer) -> int:
    """A stored message's tokens for this model (recounted when stored for another)."""
    if m.tokens is not None and m.tokens_model == tok.name:
        return m.tokens
    return tok.count_tokens(m.content)


def blocks_section(blocks: dict[str, Block]) -> str:
    parts = [
        f'<{b.name} chars="{len(b.value)}/{b.limit}">\n{b.value}\n</{b.name}>'
        for b in blocks.values()
    ]
    return "<memory_blocks>\n" + "\n".join(parts) + "\n</memory_blocks>"


def summary_section(summary: str) -> str:
    return f"<conversation_summary>\n{summary}\n</conversation_summary>"


def recalled_line(hit: SearchHit, conversation_id: str | None) -> str:
    m = _message(hit)
    where = f"#{m.seq}" if m.conversation_id == conversation_id else "another conversation"
    return f"- [{m.created_at:%Y-%m-%d %H:%M} {m.role}, {where}] {m.content}"


def archive_line(hit: ArchiveHit) -> str:
    e = hit.entry
    text = " ".join(e.text.split())
    return f"- [{e.kind}, {e.updated_at:%Y-%m-%d}] {text}"


def _message(hit: SearchHit) -> Message:
    if hit.message is None:
        raise ValueError("context assembly recalls message hits only")
    return hit.message


def _key(hit: SearchHit) -> tuple[str, int]:
    m = _message(hit)
    return m.conversation_id, m.seq


def as_prompt(m: Message) -> PromptMessage:
    if m.role in ("user", "assistant"):
        return {"role": m.role, "content": m.content}
    return {"role": "user", "content": f"[{m.role}] {m.content}"}


_OVERHEADS: dict[str, tuple[int, int]] = {}


def _overheads(tok: Tokenizer) -> tuple[int, int]:
    """(tokens of an empty prompt with one system message, the most tokens a further
    message adds around its content); a model's template does not change."""
    if tok.name not in _OVERHEADS:
        _OVERHEADS[tok.name] = _measure_overheads(tok)
    return _OVERHEADS[tok.name]


def _measure_overheads(tok: Tokenizer) -> tuple[int, int]:
    system = {"role": "system", "content": ""}
    base = tok.count_chat_tokens([system])
    per = max(
        tok.count_chat_tokens([system, {"role": role, "content": ""}]) - base
        for role in ("user", "assistant")
    )
    return base, max(1, per)


def _walk(
    store: ConversationStore, tok: Tokenizer, req: ContextRequest, cap: int, per: int
) -> tuple[list[tuple[Message, int]], bool]:
    """Latest history messages, newest first, while they fit in ``cap``; and whether older
    unsummarised ones were left out for lack of room."""
    conv = req.conversation
    if conv is None:
        return [], False
    out: list[tuple[Message, int]] = []
    used = 0
    seq = req.before_seq - 1
    low = conv.summary_upto + 1
    while seq >= low:
        chunk = store.messages(req.tenant, conv.id, range(max(low, seq - CHUNK + 1), seq + 1))
        for m in reversed(chunk):
            if req.recent_limit is not None and len(out) >= req.recent_limit:
                return out, False
            cost = message_tokens(m, tok) + per
            if used + cost > cap:
                return out, True
            out.append((m, cost))
            used += cost
        seq -= CHUNK
    return out, False


def assemble(store: ConversationStore, tok: Tokenizer, req: ContextRequest) -> Assembly:
    """Build the prompt for ``req`` within ``req.window - req.max_tokens`` tokens."""
    conv = req.conversation
    cid = conv.id if conv is not None else None
    budget = req.window - req.max_tokens
    sections: dict[str, str] = {}
    if req.system_prompt:
        sections["system"] = req.system_prompt
    if req.blocks:
        sections["blocks"] = blocks_section(req.blocks)
    if conv is not None and conv.summary:
        sections["summary"] = summary_section(conv.summary)
    if req.tools_text:
        sections["tools"] = req.tools_text
    counts = {name: tok.count_tokens(text) for name, text in sections.items()}
    base, per = _overheads(tok)
    own = [tok.count_tokens(str(m["content"])) for m in req.pinned]
    rounds = [tok.count_tokens(str(m["content"])) for m in req.extra]
    fixed = base + sum(counts.values()) + 2 * len(sections)
    fixed += sum(own) + sum(rounds) + per * (len(own) + len(rounds))
    free = max(0, budget - fixed)  # an estimate; the exact count below has the last word
    in_window = {(cid, int(m["seq"])) for m in req.pinned if "seq" in m}
    lines = [(h, recalled_line(h, cid)) for h in req.semantic if _key(h) not in in_window]
    line_cost = [tok.count_tokens(text) + 1 for _, text in lines]
    wanted = sorted(line_cost[: req.semantic_k * 2])[: req.semantic_k]
    notes = [(h, archive_line(h)) for h in req.archive[: req.archive_k]]
    note_cost = [tok.count_tokens(text) + 1 for _, text in notes]
    wrappers = 8 * (bool(lines) + bool(notes))  # the sections' tags, roughly
    wanted_all = sum(wanted) + sum(note_cost) + wrappers
    reserve = min(int(free * req.semantic_share), wanted_all) if lines or notes else 0
    cap = free - reserve
    walked, overflow = _walk(store, tok, req, cap, per)
    recent_ids = {(cid, m.seq) for m, _ in walked}
    room = free - sum(c for _, c in walked) - wrappers
    noted: list[tuple[ArchiveHit, str, int]] = []
    for (note, text), cost in zip(notes, note_cost, strict=True):
        if cost <= room:
            noted.append((note, text, cost))
            room -= cost
    chosen: list[tuple[SearchHit, str, int]] = []
    for (hit, text), cost in zip(lines, line_cost, strict=True):
        if len(chosen) < req.semantic_k and _key(hit) not in recent_ids and cost <= room:
            chosen.append((hit, text, cost))
            room -= cost
    semantic_used = sum(c for _, _, c in chosen)
    archive_used = sum(c for _, _, c in noted)
    while True:
        messages = _render(sections, noted, chosen, walked, req)
        exact = tok.count_chat_tokens(messages)
        if exact <= budget:
            break
        if not chosen and not noted and not walked:
            raise StepInputError(
                f"the prompt is {exact} tokens even without history; with max_tokens "
                f"{req.max_tokens} that is over the {req.window}-token window of model "
                f"{tok.name!r}"
            )
        # Estimates run low when text tokenizes differently inside the template: drop
        # enough to cover the overshoot, scaled by how far off the estimate was.
        estimate = fixed + semantic_used + archive_used + sum(c for _, c in walked)
        need = (exact - budget) * exact / max(estimate, 1)
        while need > 0 and (chosen or noted or walked):
            recalled = chosen or noted
            if recalled and (semantic_used + archive_used > reserve or not walked):
                if chosen:
                    cost = chosen.pop()[2]
                    semantic_used -= cost
                else:
                    cost = noted.pop()[2]
                    archive_used -= cost
            else:
                cost = walked.pop()[1]
                overflow = True
            need -= cost
    tokens = {
        "system": counts.get("system", 0),
        "blocks": counts.get("blocks", 0),
        "summary": counts.get("summary", 0),
        "archive": sum(c - 1 for _, _, c in noted),
        "semantic": sum(c - 1 for _, _, c in chosen),
        "tools": counts.get("tools", 0),
        "recent": sum(c - per for _, c in walked),
        "input": sum(own),
        "tool_rounds": sum(rounds),
    }
    tokens["template"] = exact - sum(tokens.values())
    tokens |= {"prompt": exact, "budget": budget, "window": req.window}
    fold_upto = None
    if overflow:
        fold_upto = walked[-1][0].seq - 1 if walked else req.before_seq - 1
        kept = 0
        for m, cost in walked:
            kept += cost
            if kept > cap // 2:
                fold_upto = m.seq
                break
    return Assembly(
        messages=messages,
        tokens=tokens,
        recent=[m for m, _ in reversed(walked)],
        semantic=[h for h, _, _ in chosen],
        overflow=overflow,
        fold_upto=fold_upto,
        archive=[h for h, _, _ in noted],
    )


def _render(
    sections: dict[str, str],
    noted: list[tuple[ArchiveHit, str, int]],
    chosen: list[tuple[SearchHit, str, int]],
    walked: list[tuple[Message, int]],
    req: ContextRequest,
) -> list[PromptMessage]:
    parts = [sections[k] for k in ("system", "blocks", "summary") if k in sections]
    if noted:
        parts.append(
            "<long_term_memory>\n" + "\n".join(t for _, t, _ in noted) + "\n</long_term_memory>"
        )
    if chosen:
        parts.append(
            "<recalled_messages>\n" + "\n".join(t for _, t, _ in chosen) + "\n</recalled_messages>"
        )
    if "tools" in sections:
        parts.append(sections["tools"])
    out: list[PromptMessage] = []
    if parts:
        out.append({"role": "system", "content": "\n\n".join(parts)})
    out += [as_prompt(m) for m, _ in reversed(walked)]
    out += [{"role": m["role"], "content": m["content"]} for m in req.pinned]
    out += [{"role": m["role"], "content": m["content"]} for m in req.extra]
    return out
