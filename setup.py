"""Which files the wheel carries; everything else about the project is in pyproject.toml.

The one thing pyproject.toml cannot say: the default configs live at the top of the repository
(configs/, where a checkout's users and docs find them), yet an installed wheel needs them inside
the package. Mapping the data package ``mnapps.configs`` onto that folder ships them as
``mnapps/configs/*.yaml``, where ``mnapps.config.CONFIG_DIR`` looks first.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["mnapps*"]) + ["mnapps.configs"],
    package_dir={"mnapps.configs": "configs"},
    package_data={"mnapps": ["resources/*"], "mnapps.configs": ["*.yaml"]},
)
