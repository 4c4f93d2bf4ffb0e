"""What the source says about itself for the output's model card: its Hub id, license and task.

The Hub builds its model tree from a card's `base_model`, so it must be the id of the model that
was quantized, never a guess: the config key `base_model`, else the Hub cache path the source was
read from (`models--org--name/snapshots/...`), else config.json's `_name_or_path` when it has the
form `org/name` and is not one of the source card's own `base_model` entries (a finetune's config
often names its parent there). A source's own card names its parent under `base_model`, so that
field is never taken as the source's id. License and task come from the source card's front matter,
read with huggingface_hub's own parser.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""`org/name` as the Hub spells repository ids."""
LICENSE_KEYS = ("license", "license_name", "license_link")


@dataclasses.dataclass(frozen=True, slots=True)
class SourceCard:
    """The source's Hub id (and where it was found), license fields and pipeline tag."""

    hub_id: str | None
    found_in: str
    """Where the id came from, or why there is none (shown in the card's front matter comment)."""
    license: dict[str, str]
    pipeline_tag: str
    """The source card's, else `text-generation` (`image-text-to-text` for an image-text model)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _front_matter(source: Path) -> dict:
    """The source README.md's YAML front matter ({} when it has none or it does not parse)."""
    readme = source / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(readme) or {}
    except Exception:  # a malformed card must not stop a run that already quantized the model
        return {}


def _cache_id(source: Path) -> str | None:
    """`org/name` of a Hub cache snapshot path: .../models--org--name/snapshots/<revision>."""
    for part in source.resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def read_source_card(source: Path, config: dict, configured: str = "") -> SourceCard:
    """The source's card facts; `configured` is the config key `base_model` (empty: not set)."""
    meta = _front_matter(source)
    parents = meta.get("base_model") or []
    parents = {parents} if isinstance(parents, str) else set(parents)
    named = str(config.get("_name_or_path") or "")
    if configured:
        hub_id, found_in = configured, "config key base_model"
    elif (cached := _cache_id(source)) is not None:
        hub_id, found_in = cached, "the Hugging Face cache path"
    elif HUB_ID.match(named) and named not in parents:
        hub_id, found_in = named, "config.json _name_or_path"
    else:
        hub_id = None
        found_in = (f"the source ({source.name}) names no Hub id of its own; set the config key base_model "
                    "to the Hub id of the model that was quantized")
    license_ = {k: str(meta[k]) for k in LICENSE_KEYS if meta.get(k)}
    task = meta.get("pipeline_tag") or ("image-text-to-text" if "vision_config" in config else "text-generation")
    return SourceCard(hub_id, found_in, license_, task)
