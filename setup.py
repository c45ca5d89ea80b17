"""Packaging for Apache Beam workers only: `--setup_file ./setup.py` ships data_prep/ and
medfinder_jax/ (and the runtime requirements) to Dataflow, Flink or Spark workers that convert
a corpus (README, "Conversion on Apache Beam"). The project itself runs from its checkout."""

import os

import setuptools

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements():
  """requirements.txt without comments: what a worker needs to read and convert studies."""
  with open(os.path.join(HERE, "requirements.txt"), encoding="utf-8") as file:
    return [line.split("#")[0].strip() for line in file if line.split("#")[0].strip()]


setuptools.setup(
    name="medfinder-jax",
    version="0.1.0",
    description="MedFinder-JAX: CT corpus conversion for Apache Beam workers",
    packages=setuptools.find_packages(include=["data_prep", "medfinder_jax", "medfinder_jax.*"]),
    install_requires=requirements(),
    python_requires=">=3.10",
)
