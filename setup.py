# Declarative metadata lives in setup.cfg; this shim only regenerates
# Twisted's plugin cache after install so twistd finds `cdtwist` quickly.
from setuptools import setup

setup()
