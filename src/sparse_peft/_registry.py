"""The only module of sparse_peft that touches peft internals.

``peft.register_peft_method`` refuses names that are not members of peft's own ``PeftType`` enum, so we keep our
own ``str`` enum (name == value) and write its members into peft's three mapping tables. Because the members are
``str`` subclasses, the plain strings read back from ``adapter_config.json`` (``"SPARSE_LORA"``) hash and compare
equal to them, so ``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained`` and transformers' ``load_adapter``
all resolve our tuners once :func:`register` has run (``import sparse_peft`` runs it).

:func:`register` writes into peft's tables in place and never replaces them: peft modules that imported a table
before sparse_peft was imported hold the same dict object, so they see our types too. Nothing here runs before
``import sparse_peft``. A process that loads a saved sparse adapter without that import gets peft's own
``KeyError: 'SPARSE_LORA'``; the fix is written where the user meets the adapter, in the model card (``README.md``)
that ``PeftModel.save_pretrained`` writes next to it (:func:`add_loading_section`), and in the docs.

Everything else in sparse_peft imports peft-private names only through this module.
"""

from __future__ import annotations

import enum
import functools
import os

__all__ = [
    "SparsePeftType",
    "add_loading_section",
    "register",
    "registered_types",
]

_TABLES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


class SparsePeftType(str, enum.Enum):
    """peft types added by sparse_peft. The value is what ``adapter_config.json`` stores as ``peft_type``."""

    SPARSE_LORA = "SPARSE_LORA"
    SPIEL = "SPIEL"
    S2FT = "S2FT"

    @property
    def prefix(self) -> str:
        """The state-dict prefix of the tuner's adapter attributes (peft requires ``value.lower() + "_"``)."""
        return self.value.lower() + "_"


def __getattr__(name: str):
    if name == "BufferDict":  # re-exported lazily: adapter state that is saved with the adapter
        from peft.tuners._buffer_dict import BufferDict

        return BufferDict
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register(peft_type: SparsePeftType, config_cls: type, model_cls: type) -> None:
    """Make ``peft_type`` known to peft. Idempotent, so re-importing sparse_peft is harmless."""
    from peft import mapping

    if getattr(model_cls, "prefix", None) != peft_type.prefix:
        raise ValueError(
            f"{model_cls.__name__}.prefix must be {peft_type.prefix!r} for peft type {peft_type.value}, "
            f"got {getattr(model_cls, 'prefix', None)!r}"
        )
    # item assignment into peft's own dicts: never rebind them (modules that imported them keep their reference)
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = peft_type.prefix
    _wrap_model_card()


def registered_types() -> dict[str, type]:
    """Our peft types that peft currently resolves, mapped to their config class (used by tests and diagnostics)."""
    from peft import mapping

    return {
        t.value: mapping.PEFT_TYPE_TO_CONFIG_MAPPING[t]
        for t in SparsePeftType
        if t in mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    }


# ---- the adapter's model card ----------------------------------------------------------------------------------
CARD_LIBRARY = "sparse_peft"
CARD_MARKER = "<!-- sparse_peft: how to load -->"  # makes the section idempotent across repeated saves
CARD_PLACEHOLDER = "<this folder or its hub id>"


def _sparse_types(peft_model) -> list[str]:
    """Our peft types among the model's adapters, sorted."""
    types = {str(getattr(c.peft_type, "value", c.peft_type)) for c in peft_model.peft_config.values()}
    return sorted(types & set(SparsePeftType._value2member_map_))


def loading_snippet(auto_class: str, peft_types: list[str]) -> str:
    """The two lines that load a saved sparse adapter: ``import sparse_peft`` and an ``AutoPeftModel*`` call."""
    return (
        f"import peft, sparse_peft  # sparse_peft registers {', '.join(peft_types)} with peft\n"
        f'model = peft.{auto_class}.from_pretrained("{CARD_PLACEHOLDER}")\n'
    )


def _loading_section(auto_class: str, peft_types: list[str]) -> str:
    fence = "```"
    return (
        f"{CARD_MARKER}\n## How to load this adapter\n\n"
        f"This adapter uses the {', '.join(f'`{t}`' for t in peft_types)} tuner of `sparse_peft`, a plugin for "
        "PEFT (`pip install sparse-peft`). Import `sparse_peft` before loading it, so that PEFT knows the tuner "
        f"type; without it PEFT raises `KeyError: '{peft_types[0]}'`.\n\n"
        f"{fence}python\n{loading_snippet(auto_class, peft_types)}{fence}\n"
    )


def add_loading_section(peft_model, output_dir: str) -> bool:
    """Mark the model card ``output_dir/README.md`` as a sparse_peft adapter and say how to load it.

    Sets the card's ``library_name`` to ``sparse_peft`` (tags keep ``peft``) and puts a "How to load this
    adapter" section with :func:`loading_snippet` after the card's title, once. Does nothing, and returns
    ``False``, when none of the model's adapters is a sparse_peft type or there is no card.
    """
    types = _sparse_types(peft_model)
    path = os.path.join(output_dir, "README.md")
    if not types or not os.path.isfile(path):
        return False
    import peft
    from huggingface_hub import ModelCard

    auto_class = "Auto" + type(peft_model).__name__
    auto_class = auto_class if hasattr(peft, auto_class) else "AutoPeftModel"
    card = ModelCard.load(path)
    card.data["library_name"] = CARD_LIBRARY
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | {"peft", CARD_LIBRARY})
    if CARD_MARKER not in card.text:
        lines = card.text.splitlines()
        title = next((i + 1 for i, line in enumerate(lines) if line.startswith("# ")), 0)
        lines[title:title] = ["", _loading_section(auto_class, types)]
        card.text = "\n".join(lines)
    card.save(path)
    return True


def _wrap_model_card() -> None:
    """Make ``PeftModel.create_or_update_model_card`` (called by ``save_pretrained``) add our section. Idempotent.

    Only adapters of our types are affected: for every other model the wrapper returns right after peft's own card.
    """
    from peft import PeftModel

    peft_card = PeftModel.create_or_update_model_card
    if getattr(peft_card, "__sparse_peft__", False):
        return

    @functools.wraps(peft_card)
    def create_or_update_model_card(self, output_dir: str):
        result = peft_card(self, output_dir)
        add_loading_section(self, output_dir)
        return result

    create_or_update_model_card.__sparse_peft__ = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
