"""The model catalog, with which files are present and which pools are live (OpenAI's
model list is ``/v1/models``, in :mod:`app.api.routes.openai_compat`)."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter

from app.api.deps import ApiKeyDep, CatalogDep, SettingsDep
from app.scheduler import live
from app.workflows.schemas import ModelPublic

router = APIRouter(prefix="/v1/catalog", tags=["models"])


@router.get("", response_model=list[ModelPublic])
def list_models(_key: ApiKeyDep, catalog: CatalogDep, settings: SettingsDep) -> list[ModelPublic]:
    """Every catalog model: kind, context, whether its GGUF is here, live workers."""
    workers = Counter(w.get("model") for w in live.live_workers())
    out = []
    for entry in catalog.entries:
        path = catalog.path_for(entry, settings.models_path)
        out.append(
            ModelPublic(
                name=entry.name,
                kind=entry.kind,
                description=entry.description,
                n_ctx=entry.n_ctx,
                context_length=entry.context_length,
                file=entry.file,
                present=path.is_file(),
                size_bytes=entry.size_bytes,
                workers=workers.get(entry.name, 0),
                queue=f"model.{entry.name}",
            )
        )
    return out
