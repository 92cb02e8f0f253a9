"""Run at interpreter start by ``sparse_peft_boot.pth`` (installed with sparse_peft); costs about a millisecond.

It loads only ``sparse_peft/_registry.py`` (not the package, not peft) and asks it to make peft explain a missing
sparse_peft type, so loading a saved sparse adapter without ``import sparse_peft`` says what to do. Set
``SPARSE_PEFT_NO_BOOT=1`` to skip it.
"""

import importlib.util
import os


def _boot() -> None:
    if os.environ.get("SPARSE_PEFT_NO_BOOT"):
        return
    package = importlib.util.find_spec("sparse_peft")  # locates, does not import
    if package is None or not package.submodule_search_locations:
        return
    path = os.path.join(list(package.submodule_search_locations)[0], "_registry.py")
    spec = importlib.util.spec_from_file_location("_sparse_peft_boot_registry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install_missing_type_hint()


try:
    _boot()
except Exception:  # never break interpreter start-up
    pass
