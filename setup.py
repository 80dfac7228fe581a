"""Package mapping for dpprims (everything else is in pyproject.toml).

kernels/ and bindings/ live at the top of the repository (shared/DESIGN.md, section 3) but ship
only as ``dpprims.kernels`` and ``dpprims.bindings``: both bare names are taken on PyPI.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["dpprims", "dpprims.*"])
for root in ("kernels", "bindings"):
    packages.append(f"dpprims.{root}")
    packages += [f"dpprims.{root}.{sub}" for sub in find_packages(root)]

setup(
    packages=packages,
    package_dir={"dpprims": "dpprims", "dpprims.kernels": "kernels", "dpprims.bindings": "bindings"},
)
