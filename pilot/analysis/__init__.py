"""Configuration analysis (`meshctl analyze`): pure checks over mesh objects and Kubernetes facts.

``analyze(AnalysisInput) -> list[Message]``: `pilot.analysis.load` builds the input from files, a
cluster or pilot's /debug/configz; `pilot.analysis.run` holds the registry of checks (one small
module per family: documents, virtual_services, destination_rules, security, gateways, sidecars,
services); `pilot.analysis.messages` the stable codes. Nothing here does I/O but `load`'s file reads.
"""

from pilot.analysis.inputs import AnalysisInput, WorkloadFacts
from pilot.analysis.messages import CATALOG, Level, Message, MessageType
from pilot.analysis.run import CHECKS, Suppression, analyze, fails

__all__ = ["CATALOG", "CHECKS", "AnalysisInput", "Level", "Message", "MessageType", "Suppression", "WorkloadFacts",
           "analyze", "fails"]
