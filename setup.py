# Metadata lives in pyproject.toml; this shim keeps `python setup.py develop`
# and old pips working, and keeps builds out of the source tree.
import atexit
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build import build


class BuildOutsideTheTree(build):
    """Build in a temporary folder, not ./build: pip builds in the source tree, and
    a build/ left there goes stale and is copied into the next wheel (a module
    deleted from the source would still be installed)."""

    def initialize_options(self):
        super().initialize_options()
        self.build_base = tempfile.mkdtemp(prefix="sse_sam_fast-build-")
        atexit.register(shutil.rmtree, self.build_base, ignore_errors=True)


setup(cmdclass={"build": BuildOutsideTheTree})
