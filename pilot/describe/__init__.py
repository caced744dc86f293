"""`meshctl describe`: the services, rules and policies that apply to one pod, workload or service.

`describe(input, kind, namespace, name)` (`pilot.describe.facts`) reads the same input as
`meshctl analyze` and returns a frozen `Description`; `render` prints it in plain words. No I/O.
"""

from pilot.describe.facts import describe
from pilot.describe.instances import TargetNotFound
from pilot.describe.model import POD, SERVICE, WORKLOAD, Description
from pilot.describe.render import render

__all__ = ["POD", "SERVICE", "WORKLOAD", "Description", "TargetNotFound", "describe", "render"]
