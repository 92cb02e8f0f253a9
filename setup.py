"""Ships ``sparse_peft_boot.pth`` into site-packages (regular and editable installs).

The .pth runs ``_sparse_peft_boot`` at interpreter start, which makes peft say "run `import sparse_peft`" when a
saved sparse adapter is loaded without importing sparse_peft (see ``src/sparse_peft/_registry.py``). Everything else
about the build is in pyproject.toml.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = os.path.join("src", "sparse_peft_boot.pth")


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, os.path.basename(PTH)))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, os.path.basename(PTH))]


class EditableWheelWithPth(editable_wheel):
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(PTH, os.path.join(installation_dir, os.path.basename(PTH)))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
