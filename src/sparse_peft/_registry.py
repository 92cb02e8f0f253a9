"""The only module of sparse_peft that touches peft internals.

``peft.register_peft_method`` refuses names that are not members of peft's own ``PeftType`` enum, so we keep our
own ``str`` enum (name == value) and write its members into peft's three mapping tables. Because the members are
``str`` subclasses, the plain strings read back from ``adapter_config.json`` (``"SPARSE_LORA"``) hash and compare
equal to them, so ``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained`` and transformers' ``load_adapter``
all resolve our tuners once this module has run.

Everything else in sparse_peft imports peft-private names only through this module.
"""

from __future__ import annotations

import enum

from peft import mapping as _peft_mapping
from peft.tuners._buffer_dict import BufferDict  # re-exported: adapter state that is saved with the adapter

__all__ = ["BufferDict", "SparsePeftType", "register", "registered_types", "missing_type_hint"]


class SparsePeftType(str, enum.Enum):
    """peft types added by sparse_peft. The value is what ``adapter_config.json`` stores as ``peft_type``."""

    SPARSE_LORA = "SPARSE_LORA"
    SPIEL = "SPIEL"
    S2FT = "S2FT"

    @property
    def prefix(self) -> str:
        """The state-dict prefix of the tuner's adapter attributes (peft requires ``value.lower() + "_"``)."""
        return self.value.lower() + "_"


def register(peft_type: SparsePeftType, config_cls: type, model_cls: type) -> None:
    """Make ``peft_type`` known to peft. Idempotent, so re-importing sparse_peft is harmless."""
    if getattr(model_cls, "prefix", None) != peft_type.prefix:
        raise ValueError(
            f"{model_cls.__name__}.prefix must be {peft_type.prefix!r} for peft type {peft_type.value}, "
            f"got {getattr(model_cls, 'prefix', None)!r}"
        )
    _peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    _peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    _peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = peft_type.prefix


def registered_types() -> dict[str, type]:
    """Our peft types that peft currently resolves, mapped to their config class (used by tests and diagnostics)."""
    return {
        t.value: _peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[t]
        for t in SparsePeftType
        if t in _peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    }


def missing_type_hint(peft_type: str) -> str:
    """The sentence we want a user to read when peft cannot resolve one of our types."""
    return (
        f"peft type {peft_type!r} is provided by sparse_peft. Run `import sparse_peft` before "
        "`PeftConfig.from_pretrained`, `PeftModel.from_pretrained`, `AutoPeftModel*.from_pretrained` or "
        "`model.load_adapter` (install it with `pip install sparse-peft`)."
    )
