"""meshctl: the command line for running, installing and inspecting the mesh."""

__version__ = "0.1.0"
