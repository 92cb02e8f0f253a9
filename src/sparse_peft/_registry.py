"""The only module of sparse_peft that touches peft internals.

``peft.register_peft_method`` refuses names that are not members of peft's own ``PeftType`` enum, so we keep our
own ``str`` enum (name == value) and write its members into peft's three mapping tables. Because the members are
``str`` subclasses, the plain strings read back from ``adapter_config.json`` (``"SPARSE_LORA"``) hash and compare
equal to them, so ``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained`` and transformers' ``load_adapter``
all resolve our tuners once this module has run.

The same tables carry the hint for users who load a sparse adapter without importing sparse_peft first: the
``sparse_peft_boot.pth`` file installed next to the package calls :func:`install_missing_type_hint` at interpreter
start, which makes a failed look-up of one of our types say "run `import sparse_peft`" instead of a bare
``KeyError: 'SPARSE_LORA'``. For that reason this module imports peft lazily and nothing at its top level is heavy.

Everything else in sparse_peft imports peft-private names only through this module.
"""

from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import sys

__all__ = [
    "BufferDict",
    "SparsePeftType",
    "install_missing_type_hint",
    "missing_type_hint",
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
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = peft_type.prefix


def registered_types() -> dict[str, type]:
    """Our peft types that peft currently resolves, mapped to their config class (used by tests and diagnostics)."""
    from peft import mapping

    return {
        t.value: mapping.PEFT_TYPE_TO_CONFIG_MAPPING[t]
        for t in SparsePeftType
        if t in mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    }


def missing_type_hint(peft_type: str) -> str:
    """The sentence we want a user to read when peft cannot resolve one of our types."""
    return (
        f"peft type {peft_type!r} is provided by sparse_peft. Run `import sparse_peft` before "
        "`PeftConfig.from_pretrained`, `PeftModel.from_pretrained`, `AutoPeftModel*.from_pretrained` or "
        "`model.load_adapter` (install it with `pip install sparse-peft`)."
    )


# ---- the hint for a forgotten `import sparse_peft` ------------------------------------------------------------
class MissingSparsePeftType(KeyError):
    """Raised by peft's mapping tables for one of our types while sparse_peft is not imported."""

    def __str__(self) -> str:
        return str(self.args[0])


class _HintingTable(dict):
    """A peft mapping table that explains a missing sparse_peft type; otherwise an ordinary dict."""

    def __missing__(self, key):
        if str(getattr(key, "value", key)) in SparsePeftType._value2member_map_:
            raise MissingSparsePeftType(missing_type_hint(str(getattr(key, "value", key))))
        raise KeyError(key)


def _wrap_tables(module) -> None:
    for name in _TABLES:
        table = getattr(module, name, None)
        if isinstance(table, dict) and not isinstance(table, _HintingTable):
            setattr(module, name, _HintingTable(table))


class _WrapAfterExec(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _wrap_tables(module)


class _PeftMappingFinder(importlib.abc.MetaPathFinder):
    """Wraps ``peft.mapping``'s tables right after the module runs, before any other peft module imports them."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft.mapping":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _WrapAfterExec(spec.loader)
        return spec


def install_missing_type_hint() -> None:
    """Arrange for peft to name ``import sparse_peft`` when it meets one of our types unimported. Cheap and safe."""
    if "peft.mapping" in sys.modules:
        _wrap_tables(sys.modules["peft.mapping"])
    elif not any(isinstance(f, _PeftMappingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftMappingFinder())
